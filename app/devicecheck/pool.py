"""Two worker processes of the service's own pool render the same image (the cross-process check)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from app.params import GenerationParams
from app.worker.messages import ImageFailed, ImageRendered, RenderImage, WorkerConfig, WorkerFailed, WorkerReady
from app.worker.pool import WorkerExited, WorkerHandle, WorkerPool


@dataclass
class PoolResult:
    """What the pool's workers rendered, their pids, and what was measured about them."""

    images: list[ImageRendered]
    pids: list[int]
    measures: list[tuple[str, float | None, str]] = field(default_factory=list)


def worker_configs(run: Any, count: int) -> list[WorkerConfig]:
    """`count` workers on the run's device, loading the devicecheck model."""
    from app.devicecheck.workload import MODEL_ID

    return [
        WorkerConfig(
            worker_id=f"dc{i}",
            device=run.o.device,
            cpu_threads=run.o.threads,
            cpu_mkldnn=True,
            registry_path=run.registry,
            data_dir=run.o.work / "pool-data",
            preload=(MODEL_ID,),
            allow_download=False,
            log_level="warning",
        )
        for i in range(count)
    ]


def render_on_workers(run: Any, *, seed: int, count: int, timeout_s: float) -> PoolResult:
    """Start `count` pool workers, send each the same RenderImage, collect the images; always stops the pool."""
    from app.devicecheck.workload import MODEL_ID, NEGATIVE, PROMPT

    params = GenerationParams(model=MODEL_ID, prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed,
                              steps=run.o.check_steps, guidance_scale=7.5, width=run.o.size, height=run.o.size,
                              sampler="pndm", num_images=1)
    job = RenderImage(job_id="devicecheck", index=0, params=params)
    return asyncio.run(_render(run, worker_configs(run, count), job, timeout_s))


async def _render(run: Any, configs: list[WorkerConfig], job: RenderImage, timeout_s: float) -> PoolResult:
    from app.devicecheck.probe import gpu_memory_by_pid, peak_rss_mib

    loop = asyncio.get_running_loop()
    ready = {c.worker_id: loop.create_future() for c in configs}
    done = {c.worker_id: loop.create_future() for c in configs}

    def settle(future: asyncio.Future, value: Any = None, error: str | None = None) -> None:
        if not future.done():
            future.set_exception(RuntimeError(error)) if error else future.set_result(value)

    def sink(handle: WorkerHandle, event: Any, finished: Any = None) -> None:
        if isinstance(event, WorkerReady):
            settle(ready[handle.id], event)
        elif isinstance(event, WorkerFailed):
            settle(ready[handle.id], error=f"worker {handle.id} failed to start: {event.message}")
        elif isinstance(event, ImageRendered):
            settle(done[handle.id], event)
        elif isinstance(event, ImageFailed):
            settle(done[handle.id], error=f"worker {handle.id}: {event.error_type}: {event.message}")
        elif isinstance(event, WorkerExited):
            for future in (ready[handle.id], done[handle.id]):
                settle(future, error=f"worker {handle.id} exited with code {event.exitcode}")

    pool = WorkerPool(configs, sink)
    started = time.monotonic()
    pool.start()
    try:
        async with asyncio.timeout(timeout_s):
            events = await asyncio.gather(*ready.values())
            ready_s = time.monotonic() - started
            pids = [e.pid for e in events]
            for handle in pool.workers.values():
                pool.assign(handle.id, job)
            images = await asyncio.gather(*done.values())
        measures: list[tuple[str, float | None, str]] = [
            (f"time to ready, {len(configs)} pool workers started together", round(ready_s, 2), "s"),
            ("model load per pool worker (in-worker)",
             max(e.models[job.params.model]["load_seconds"] for e in events), "s"),
        ]
        if run.o.kind == "cuda":
            by_pid = gpu_memory_by_pid()
            held = [by_pid[p] for p in pids if p in by_pid]
            measures.append(("GPU memory per pool worker", max(held) if held else None, "MiB"))
        rss = [r for r in (peak_rss_mib(p) for p in pids) if r is not None]
        measures.append(("peak RSS per pool worker", max(rss) if rss else None, "MiB"))
        return PoolResult(images=list(images), pids=pids, measures=measures)
    finally:
        await pool.stop()
