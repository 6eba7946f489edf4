"""`python -m app.cli.ray_bench` (in `make bench`): images/s of 1 vs 2 Ray Serve replicas behind one ingress.

A local Ray head with 2 logical CPUs; for each replica count an ingress (`serve --ray`, `cpu:N`,
1 torch thread per replica) on the `sameseed-bench` model (128x128, 20 PNDM steps), warmed, then
`--rounds` rounds of `--images` concurrent single-image requests; the replica counts alternate
for `--cycles` cycles. Prints the median images/s of each, their ratio (goal >= 1.7) and the
machine's load average around every round (the figure is only as good as the machine is quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.cli.bench import BENCH_MODEL, _http_call
from app.cli.ray_cluster import LocalRayCluster
from app.cli.server_process import ServerProcess

PARAMS = {"prompt": "a photo of a cat", "seed": 7, "steps": 20, "guidance_scale": 7.5, "width": 128, "height": 128}


def _ready_replicas(server: ServerProcess, replicas: int, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        states = [w["state"] for w in server.client.get("/readyz").json()["workers"]]
        if states.count("ready") == replicas:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{replicas} replicas not ready within {deadline_s}s:\n{server.logs()}")


def measure(cluster: LocalRayCluster, data: Path, replicas: int, rounds: int, images: int) -> list[dict[str, Any]]:
    """Rounds of `images` concurrent requests through an ingress with `replicas` CPU replicas: images/s and load."""
    server = ServerProcess(
        data, SAMESEED_RAY_ADDRESS=cluster.address, SAMESEED_WORKERS=f"cpu:{replicas}",
        SAMESEED_DEFAULT_MODEL=BENCH_MODEL,
    ).start(deadline_s=300)
    try:
        _ready_replicas(server, replicas)
        with ThreadPoolExecutor(max_workers=replicas) as warm:  # each replica renders one before timing
            list(warm.map(lambda k: _http_call(server, {**PARAMS, "seed": k}), range(replicas)))
        results = []
        for r in range(rounds):
            load_before = os.getloadavg()[0]
            seeds = [1000 * (r + 1) + k for k in range(images)]
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=images) as pool:
                list(pool.map(lambda seed: _http_call(server, {**PARAMS, "seed": seed}), seeds))
            seconds = time.perf_counter() - started
            results.append({"replicas": replicas, "images_per_s": images / seconds,
                            "load_before": load_before, "load_after": os.getloadavg()[0]})
    finally:
        server.stop()
    return results


def run(rounds: int, images: int, cycles: int, out: Path | None) -> dict[str, Any]:
    """Measure, print a table and the ratio, optionally write JSON; returns the report."""
    cluster = LocalRayCluster(num_cpus=2).start()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sameseed-ray-bench-") as tmp:
            for _ in range(cycles):
                for replicas in (1, 2):
                    rows += measure(cluster, Path(tmp) / "data", replicas, rounds, images)
    finally:
        cluster.stop()
    medians = {n: statistics.median(r["images_per_s"] for r in rows if r["replicas"] == n) for n in (1, 2)}
    report = {
        "params": {**PARAMS, "model": BENCH_MODEL, "threads_per_replica": 1, "images": images, "rounds": rounds,
                   "cycles": cycles, "cpus": os.cpu_count()},
        "rounds": rows,
        "images_per_s_1_replica": medians[1],
        "images_per_s_2_replicas": medians[2],
        "scaling": medians[2] / medians[1],
    }
    for row in rows:
        print(f"{row['replicas']} replica(s): {row['images_per_s']:.3f} img/s "
              f"(load {row['load_before']:.1f} -> {row['load_after']:.1f})")
    verdict = "PASS" if report["scaling"] >= 1.7 else "FAIL"
    print(f"Ray Serve, median: 1 replica {medians[1]:.3f} img/s, 2 replicas {medians[2]:.3f} img/s, "
          f"scaling {report['scaling']:.2f}x [{verdict} >= 1.7]")
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m app.cli.ray_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per ingress start")
    parser.add_argument("--images", type=int, default=12, help="concurrent single-image requests per round")
    parser.add_argument("--cycles", type=int, default=1, help="times the 1- and 2-replica measurements alternate")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    run(args.rounds, args.images, args.cycles, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
