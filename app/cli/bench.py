"""`python -m app bench`: service overhead, worker scaling and time to ready, measured side by side."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.cli.listener_bench import ListenerReport, measure_listener_cost, verdict_text
from app.cli.server_process import ServerProcess

BENCH_MODEL = "sameseed-bench"
# C2PA cost grows with the PNG's bytes (the hard binding hashes the file): noise is the largest PNG
# of a size. Judged at SD1.5's 512x512; 1024x1024 (SDXL) shown beside it.
C2PA_SIZES = (128, 512, 1024)
C2PA_JUDGED_SIZE = "512x512"
LISTENER_ROUNDS = 8  # of each kind: 4–6 minutes on the shared 2-core machine
BENCH_PARAMS = {
    "prompt": "a photo of a cat", "seed": 7, "steps": 20, "guidance_scale": 7.5, "width": 128, "height": 128
}


@dataclass
class CobatchReport:
    """Co-batching on vs off, side by side on two `cpu:2` servers (bench model), interleaved rounds."""

    concurrent: int
    rounds: int
    off_ips: float  # images/s, median over rounds, SAMESEED_MAX_BATCH=1
    on_ips: float  # images/s, median over rounds, co-batching on (the default)
    speedup: float
    lone_off_median_s: float  # one request at a time on an idle server
    lone_on_median_s: float
    cobatched_fraction: float  # of the co-batching server's burst images, those made in a co-batched call
    identical: bool  # every image of the co-batching server had the hashes of the same seed on the other
    proofs: list[dict[str, Any]] = field(default_factory=list)  # the co-batching server's start-up proof

    def rows(self) -> list[tuple[str, str, str]]:
        """Table rows: throughput, lone latency, fraction co-batched and bitwise identity."""
        return [
            (f"cpu:2, {self.concurrent} concurrent, co-batching off", f"{self.off_ips:.3f} img/s", ""),
            (f"cpu:2, {self.concurrent} concurrent, co-batching on", f"{self.on_ips:.3f} img/s", ""),
            ("co-batching speedup (on / off)", f"{self.speedup:.2f}x", verdict_text(self.speedup >= 1.3, ">= 1.3")),
            ("lone request, co-batching off, median", f"{self.lone_off_median_s:.3f} s", ""),
            (
                "lone request, co-batching on, median",
                f"{self.lone_on_median_s:.3f} s",
                verdict_text(self.lone_on_median_s <= 1.05 * self.lone_off_median_s, "within 5 % of off"),
            ),
            ("images co-batched (on)", f"{100 * self.cobatched_fraction:.0f} %", ""),
            ("every image bitwise equal on and off", "yes" if self.identical else "NO", ""),
        ]


@dataclass
class BenchReport:
    """Every figure the bench measured, with the targets they are judged against."""

    overhead_http_median_s: float
    overhead_direct_median_s: float
    overhead_ratio: float
    throughput_1_worker_ips: float
    throughput_2_workers_ips: float
    scaling: float
    ready_median_s: float
    ready_runs_s: list[float]
    params: dict[str, Any]
    c2pa_sign_median_ms: dict[str, float] = field(default_factory=dict)  # PNG size -> ms per image
    listener: ListenerReport | None = None
    cobatch: CobatchReport | None = None

    def table(self) -> str:
        """A plain-text table of the results against their targets."""
        rows = [
            ("end-to-end HTTP, median", f"{self.overhead_http_median_s:.3f} s", ""),
            ("plain diffusers in-process, median", f"{self.overhead_direct_median_s:.3f} s", ""),
            (
                "overhead ratio (HTTP / direct)",
                f"{self.overhead_ratio:.3f}",
                verdict_text(self.overhead_ratio <= 1.05, "<= 1.05"),
            ),
            ("cpu:1 throughput", f"{self.throughput_1_worker_ips:.3f} img/s", ""),
            ("cpu:2 throughput", f"{self.throughput_2_workers_ips:.3f} img/s", ""),
            ("scaling (cpu:2 / cpu:1)", f"{self.scaling:.2f}x", verdict_text(self.scaling >= 1.7, ">= 1.7")),
            (
                "process start to ready, median",
                f"{self.ready_median_s:.2f} s",
                verdict_text(self.ready_median_s <= 8, "<= 8 s"),
            ),
        ]
        for size, ms in self.c2pa_sign_median_ms.items():
            judged = size == C2PA_JUDGED_SIZE
            verdict = verdict_text(ms <= 25, "<= 25 ms") if judged else ""
            rows.append((f"C2PA sign + embed, {size} noise PNG, median", f"{ms:.1f} ms", verdict))
        if self.listener is not None:
            rows.extend(self.listener.rows())
        if self.cobatch is not None:
            rows.extend(self.cobatch.rows())
        return _table(rows)


def _table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>14}  {target}".rstrip() for name, value, target in rows)


def _direct_pipeline(folder: Path, threads: int) -> Any:
    import torch

    from app.pipeline.determinism import configure_torch
    from app.pipeline.loader import quiet_libraries

    configure_torch("cpu", threads, True)
    quiet_libraries()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    torch.set_num_threads(threads)
    return pipe


def _direct_call(pipe: Any, params: dict[str, Any]) -> float:
    import torch

    started = time.perf_counter()
    pipe(
        params["prompt"],
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        width=params["width"],
        height=params["height"],
        generator=torch.Generator("cpu").manual_seed(params["seed"]),
        output_type="pil",
    )
    return time.perf_counter() - started


def _http_call(server: ServerProcess, params: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = server.post(model=BENCH_MODEL, sampler="pndm", **params)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"bench request failed: {response.status_code} {response.text[:500]}")
    return elapsed


def measure_overhead(work: Path, runs: int, params: dict[str, Any]) -> tuple[float, float]:
    """Interleave HTTP and in-process runs on the bench model; return both medians."""
    server = ServerProcess(work / "data", SAMESEED_DEFAULT_MODEL=BENCH_MODEL).start()
    try:
        folder = Path(server.post(model=BENCH_MODEL, **{**params, "steps": 1}).json()["manifest"]["model"]["source"])
        pipe = _direct_pipeline(folder, threads=1)
        _direct_call(pipe, params)  # warm both sides
        _http_call(server, params)
        http, direct = [], []
        for i in range(runs):
            order = (_http_call, _direct_call) if i % 2 == 0 else (_direct_call, _http_call)
            for call in order:
                if call is _http_call:
                    http.append(_http_call(server, params))
                else:
                    direct.append(_direct_call(pipe, params))
    finally:
        server.stop()
    return statistics.median(http), statistics.median(direct)


def measure_throughput(work: Path, workers: int, images: int, params: dict[str, Any]) -> float:
    """Images per second of a `cpu:<workers>` server (1 thread each) on concurrent single-image requests."""
    server = ServerProcess(work / "data", SAMESEED_WORKERS=f"cpu:{workers}", SAMESEED_DEFAULT_MODEL=BENCH_MODEL).start()
    try:
        with ThreadPoolExecutor(max_workers=workers) as warm:
            list(warm.map(lambda k: _http_call(server, {**params, "seed": k}), range(workers)))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=images) as pool:
            list(pool.map(lambda k: _http_call(server, {**params, "seed": 1000 + k}), range(images)))
        return images / (time.perf_counter() - started)
    finally:
        server.stop()


def _burst(server: ServerProcess, params: dict[str, Any], seeds: list[int]) -> tuple[float, dict[int, dict[str, Any]]]:
    """Send one single-image request per seed at once; seconds to the last answer, and each seed's manifest image."""

    def one(seed: int) -> dict[str, Any]:
        response = server.post(model=BENCH_MODEL, sampler="pndm", response_format="url", **{**params, "seed": seed})
        if response.status_code != 200:
            raise RuntimeError(f"bench request failed: {response.status_code} {response.text[:500]}")
        return response.json()["manifest"]["images"][0]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        images = list(pool.map(one, seeds))
    return time.perf_counter() - started, {image["seed"]: image for image in images}


def measure_cobatching(
    work: Path, params: dict[str, Any], concurrent: int = 8, rounds: int = 5, lone_runs: int = 7
) -> CobatchReport:
    """Images/s of `concurrent` compatible requests on `cpu:2` with co-batching off and on, and lone-request
    latency, in interleaved rounds on two idle-waiting servers; checks every co-batched image's bits."""
    common = {"SAMESEED_WORKERS": "cpu:2", "SAMESEED_DEFAULT_MODEL": BENCH_MODEL}
    off = ServerProcess(work / "data", **common, SAMESEED_MAX_BATCH="1").start()
    on = None
    try:
        on = ServerProcess(work / "data", **common).start()  # the same data dir: the bench model is built once
        proofs = [v for w in on.client.get("/readyz").json()["workers"] for v in w.get("cobatch", [])]
        for server in (off, on):
            _burst(server, params, list(range(concurrent)))  # warm every worker
        rates: dict[str, list[float]] = {"off": [], "on": []}
        lone: dict[str, list[float]] = {"off": [], "on": []}
        together = cobatched = 0
        identical = True
        for r in range(rounds):
            seeds = [5000 + r * concurrent + k for k in range(concurrent)]
            results = {}
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                elapsed, images = _burst(off if name == "off" else on, params, seeds)
                rates[name].append(concurrent / elapsed)
                results[name] = images
            for seed in seeds:
                a, b = results["off"][seed], results["on"][seed]
                identical &= (a["latent_sha256"], a["pixel_sha256"]) == (b["latent_sha256"], b["pixel_sha256"])
                together += 1
                cobatched += 1 if b.get("cobatched_with", 0) > 0 else 0
        for i in range(lone_runs):
            for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                lone[name].append(_http_call(off if name == "off" else on, {**params, "seed": 9000 + i}))
    finally:
        off.stop()
        if on is not None:
            on.stop()
    off_ips, on_ips = statistics.median(rates["off"]), statistics.median(rates["on"])
    return CobatchReport(
        concurrent=concurrent, rounds=rounds, off_ips=off_ips, on_ips=on_ips, speedup=on_ips / off_ips,
        lone_off_median_s=statistics.median(lone["off"]), lone_on_median_s=statistics.median(lone["on"]),
        cobatched_fraction=cobatched / together, identical=identical, proofs=proofs,
    )


def measure_ready(work: Path, runs: int) -> list[float]:
    """Seconds from spawning `python -m app serve` (embedded default model) to /readyz 200."""
    times = []
    for _ in range(runs):
        server = ServerProcess(work / "data")
        try:
            times.append(server.start(wait_ready=False).wait_ready())
        finally:
            server.stop()
    return times


def measure_content_credentials(work: Path, runs: int, size: int) -> float:
    """Median ms to sign and embed C2PA Content Credentials into one noise PNG of size x size (in process)."""
    import io

    import numpy
    from PIL import Image

    from app.provenance.c2pa import ContentCredentials, development_credentials

    credentials = ContentCredentials(development_credentials(work / "c2pa-keys"))
    buffer = io.BytesIO()  # noise: the largest PNG of its size, so the most bytes the hard binding hashes
    noise = numpy.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=numpy.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    manifest = {
        "format": "sameseed.manifest/2",
        "id": "gen_bench",
        "service": {"name": "sameseed", "version": "bench"},
        "model": {"id": BENCH_MODEL, "family": "sd1", "pipeline": "StableDiffusionPipeline", "dtype": "float32",
                  "files": {f"unet/file-{k}": "0" * 64 for k in range(12)}},
        "runtime": {"reproducibility_key": "rk1-" + "0" * 64},
        "signature": {"algorithm": "ed25519", "key_id": "0" * 16, "value": "A" * 88},
    }
    credentials.sign_png(buffer.getvalue(), manifest, 0)  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        credentials.sign_png(buffer.getvalue(), manifest, 0)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run_cobatch_bench(*, rounds: int = 5, out: Path | None = None) -> CobatchReport:
    """Only the co-batching measurement (`python -m app bench --only cobatch`): print its rows, optionally JSON."""
    with tempfile.TemporaryDirectory(prefix="sameseed-bench-") as tmp:
        report = measure_cobatching(Path(tmp), BENCH_PARAMS, rounds=rounds)
    print(_table(report.rows()))
    if out is not None:
        out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def run_listener_bench(
    *, rounds: int = LISTENER_ROUNDS, images: int = 12, listeners: int = 200, out: Path | None = None
) -> ListenerReport:
    """Only the event-stream measurement (`python -m app bench --only listeners`): print its rows, optionally JSON."""
    with tempfile.TemporaryDirectory(prefix="sameseed-bench-") as tmp:
        report = measure_listener_cost(
            Path(tmp), images, BENCH_PARAMS, model=BENCH_MODEL, listeners=listeners, rounds=rounds
        )
    print(_table(report.rows()))
    print(f"({report.rounds_per_kind} rounds of each kind, {report.images_per_round} jobs a round, listener clients "
          f"at {report.listener_priority or 'normal priority'}, {report.seconds:.0f} s in all)")
    if out is not None:
        out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def run_bench(
    *, runs: int = 9, images: int = 12, ready_runs: int = 3, listeners: int = 200, out: Path | None = None
) -> BenchReport:
    """Run every measurement in one process, print the table, optionally write JSON."""
    params = dict(BENCH_PARAMS)
    with tempfile.TemporaryDirectory(prefix="sameseed-bench-") as tmp:
        work = Path(tmp)
        ready = measure_ready(work, ready_runs)
        http_s, direct_s = measure_overhead(work, runs, params)
        one = measure_throughput(work, 1, images, params)
        two = measure_throughput(work, 2, images, params)
        c2pa_ms = {f"{n}x{n}": measure_content_credentials(work, 20, n) for n in C2PA_SIZES}
        listener = measure_listener_cost(
            work, images, params, model=BENCH_MODEL, listeners=listeners, rounds=LISTENER_ROUNDS
        )
        cobatch = measure_cobatching(work, params)
    report = BenchReport(
        overhead_http_median_s=http_s,
        overhead_direct_median_s=direct_s,
        overhead_ratio=http_s / direct_s,
        throughput_1_worker_ips=one,
        throughput_2_workers_ips=two,
        scaling=two / one,
        ready_median_s=statistics.median(ready),
        ready_runs_s=[round(t, 3) for t in ready],
        params={**params, "model": BENCH_MODEL, "runs": runs, "images": images, "threads_per_worker": 1},
        c2pa_sign_median_ms={size: round(ms, 2) for size, ms in c2pa_ms.items()},
        listener=listener,
        cobatch=cobatch,
    )
    print(report.table())
    if out is not None:
        out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
