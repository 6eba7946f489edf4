"""Cold start with a full-size model: a worker's time to ready vs plain diffusers plus one sha256 pass (`make bench`).

Both sides start a fresh Python process and end with the pipeline in memory: the worker (the
service's own pool and worker code: pin checks, load, re-check) until it reports ready; the
baseline, `StableDiffusionPipeline.from_pretrained` of the same folder and one sha256 pass over
its files. Runs are interleaved, so a warm page cache favours neither side. Goal: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

GOAL = 1.2
MODEL_ID = "coldstart-sd15"

BASELINE = """
import hashlib, sys, time
from pathlib import Path
import torch
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1)
folder = Path(sys.argv[1])
pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=getattr(torch, sys.argv[2]), safety_checker=None,
                                               requires_safety_checker=False, local_files_only=True)
for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
"""


def build(work: Path, dtype: str) -> Path:
    """Build the full-size SD1.5-architecture folder (once per work folder) and a registry pinning it."""
    from app.models.build import file_sha256s
    from app.models.fullsize import FULLSIZE_SEED, SD15_CONFIG_DIR, build_from_configs

    folder = work / f"sd15-{dtype}"
    if not (folder / "model_index.json").is_file():
        build_from_configs(SD15_CONFIG_DIR, folder, seed=FULLSIZE_SEED, dtype=dtype)
    entry = {"id": MODEL_ID, "family": "sd1", "source": {"local": folder.name}, "dtype": dtype,
             "defaults": {"width": 512, "height": 512, "steps": 20, "guidance_scale": 7.5, "sampler": "pndm"},
             "limits": {"size_multiple": 8, "min_size": 64, "max_size": 1024, "max_pixels": 1048576,
                        "max_steps": 150},
             "sha256": file_sha256s(folder)}
    (work / "registry.yaml").write_text(yaml.safe_dump({"version": 1, "default_model": MODEL_ID,
                                                        "models": [entry]}, sort_keys=False))
    return folder


def worker_ready(work: Path) -> tuple[float, float | None, float]:
    """Spawn one CPU worker of the service's pool on the model: seconds until it is ready, its peak RSS (MiB),
    and the seconds it spent verifying and loading the model (the rest is process start and imports)."""
    from app.devicecheck.probe import peak_rss_mib
    from app.worker.messages import WorkerConfig, WorkerFailed, WorkerReady
    from app.worker.pool import WorkerExited, WorkerPool

    config = WorkerConfig(worker_id="cold", device="cpu", cpu_threads=1, cpu_mkldnn=True,
                          registry_path=work / "registry.yaml", data_dir=work / "data", preload=(MODEL_ID,),
                          allow_download=False, log_level="warning")

    async def run() -> tuple[float, float | None, float]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()

        def sink(handle: Any, event: Any, finished: Any = None) -> None:
            if ready.done():
                return
            if isinstance(event, WorkerReady):
                ready.set_result((time.monotonic(), event.pid, event.models[MODEL_ID]["load_seconds"]))
            elif isinstance(event, (WorkerFailed, WorkerExited)):
                ready.set_exception(RuntimeError(f"worker did not start: {event}"))

        pool = WorkerPool([config], sink)
        started = time.monotonic()
        pool.start()
        try:
            at, pid, load_s = await asyncio.wait_for(ready, 900)
            return at - started, peak_rss_mib(pid), load_s
        finally:
            await pool.stop()

    return asyncio.run(run())


def baseline(folder: Path, dtype: str) -> float:
    """Seconds for a fresh process to `from_pretrained` the folder and hash its files once."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", BASELINE, str(folder), dtype], check=True, capture_output=True)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; exit 0 (the goal is reported, not enforced)."""
    parser = argparse.ArgumentParser(prog="python -m app.devicecheck.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved starts per side")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--work", type=Path, default=None, help="keeps the built model between runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sameseed-coldstart-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    folder = build(work, args.dtype)
    build_s = time.monotonic() - started
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    baseline(folder, args.dtype)  # warm the page cache for both sides
    workers, plain, rss, loads = [], [], [], []
    for i in range(args.runs):
        for side in (("w", "b") if i % 2 == 0 else ("b", "w")):
            if side == "w":
                seconds, peak, load_s = worker_ready(work)
                workers.append(seconds)
                rss.append(peak)
                loads.append(load_s)
            else:
                plain.append(baseline(folder, args.dtype))
    ratio = statistics.median(workers) / statistics.median(plain)
    figures = {"model_bytes": size, "build_s": round(build_s, 1), "dtype": args.dtype,
               "worker_ready_s": [round(s, 2) for s in workers], "baseline_s": [round(s, 2) for s in plain],
               "ratio": round(ratio, 3), "goal": GOAL, "peak_rss_mib": rss,
               "worker_model_load_s": loads}
    print(f"full-size SD1.5 architecture, {args.dtype}, {size / 2**30:.2f} GiB (built in {build_s:.0f}s)")
    print(f"worker start to ready, median             {statistics.median(workers):8.2f} s")
    print(f"  of it verify + load in the worker, median {statistics.median(loads):6.2f} s")
    print(f"from_pretrained + one sha256 pass, median {statistics.median(plain):8.2f} s")
    print(f"ratio                                     {ratio:8.3f}    goal <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'MISSED'}")
    print(f"peak RSS per worker                       {max(r or 0 for r in rss):8.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
