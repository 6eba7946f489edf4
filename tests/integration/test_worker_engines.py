"""The pool and dispatcher with real worker processes and pipes, no HTTP: one fixture engine per failure mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.api.schemas import GenerationRequest
from app.errors import GenerationFailed, JobTimeout, NotReady, OutOfMemory, WorkerLost
from app.scheduler.dispatcher import Dispatcher
from app.services.generation import GenerationService
from app.worker.messages import WorkerConfig
from app.worker.pool import WorkerPool, WorkerState


class Harness:
    """A generation service over a real dispatcher and a real pool of spawned fixture-engine workers."""

    def __init__(self, registry, tmp_path: Path, engine: str, workers: int = 1, **options) -> None:
        configs = [
            WorkerConfig(
                f"w{i}", "cpu", 1, True, tmp_path / "registry.yaml", tmp_path, ("sameseed-tiny",), False,
                log_level="warning", engine=f"tests.support.engines:{engine}",
            )
            for i in range(workers)
        ]
        self.pool = WorkerPool(configs, start_timeout_s=options.get("start_timeout_s", 60.0))
        self.dispatcher = Dispatcher(pool=self.pool, max_queue=8, job_timeout_s=options.get("job_timeout_s", 30.0))
        self.service = GenerationService(registry=registry, default_model="sameseed-tiny", dispatcher=self.dispatcher)

    async def __aenter__(self) -> Harness:
        self.dispatcher.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispatcher.close(stop_timeout_s=1.0)

    async def generate(self, **fields):
        request = GenerationRequest.model_validate({"prompt": "a cat", **fields})
        return await self.service.generate(self.service.resolve(**request.param_fields()))

    async def until(self, predicate, deadline_s: float = 30.0, what: str = "condition"):
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while not (value := predicate()):
            assert loop.time() < end, f"{what} not reached within {deadline_s}s: {self.describe()}"
            await asyncio.sleep(0.02)
        return value

    async def ready(self, n: int | None = None) -> None:
        n = len(self.pool.workers) if n is None else n
        await self.until(lambda: sum(w.state is WorkerState.READY for w in self.pool.workers.values()) >= n,
                         what=f"{n} ready workers")

    def describe(self):
        return [w.describe() for w in self.pool.handles()]


def test_images_come_back_in_order_from_two_processes(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "FakeEngine", workers=2) as h:
            await h.ready()
            outcome = await h.generate(seed=10, num_images=4)
            assert [(i.image.index, i.image.seed) for i in outcome.images] == [(k, 10 + k) for k in range(4)]
            assert {i.image.worker_id for i in outcome.images} == {"w0", "w1"}  # both took images
            single = await h.generate(seed=12)
            assert single.images[0].image.latent_sha256 == outcome.images[2].image.latent_sha256

    asyncio.run(scenario())


def test_a_pipeline_error_fails_the_job_and_the_worker_keeps_serving(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "RaisingEngine") as h:
            await h.ready()
            with pytest.raises(GenerationFailed, match="the pipeline broke"):
                await h.generate(prompt="raise")
            assert (await h.generate(seed=1)).images[0].image.seed == 1
            assert h.pool.workers["w0"].restarts == 0

    asyncio.run(scenario())


def test_a_worker_dying_mid_image_is_restarted_and_the_image_retried_once(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "ExitingEngine") as h:
            await h.ready()
            with pytest.raises(WorkerLost, match="died twice"):
                await h.generate(prompt="exit")
            assert h.dispatcher.metrics.registry.get_sample_value("sameseed_image_retries_total") == 1
            await h.ready()
            assert h.pool.workers["w0"].restarts == 2  # once per death
            assert (await h.generate(seed=3)).images[0].image.seed == 3

    asyncio.run(scenario())


def test_a_hung_pipeline_answers_timeout_at_the_deadline(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "HangingEngine", job_timeout_s=1.0) as h:
            await h.ready()
            with pytest.raises(JobTimeout, match="deadline of 1s \\(started\\)"):
                await h.generate(prompt="hang")
            assert h.pool.workers["w0"].state is WorkerState.BUSY  # still stuck: visible in /readyz

    asyncio.run(scenario())


def test_out_of_memory_is_its_own_error_and_the_worker_keeps_serving(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "OutOfMemoryEngine") as h:
            await h.ready()
            with pytest.raises(OutOfMemory) as info:
                await h.generate(width=128)
            assert info.value.status == 503 and info.value.param == "width"
            assert (await h.generate(width=64)).images[0].image.width == 64

    asyncio.run(scenario())


def test_a_worker_stuck_loading_is_killed_at_the_start_timeout_and_restarted(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "LoadsForeverEngine", start_timeout_s=1.5) as h:
            worker = h.pool.workers["w0"]
            await h.until(lambda: worker.restarts >= 1, what="a restart after the start timeout")
            assert "did not become ready within 1.5s" in worker.last_error
            assert worker.state in (WorkerState.STARTING, WorkerState.RESTARTING)

    asyncio.run(scenario())


def test_a_model_that_cannot_load_fails_the_worker_for_good_with_the_reason(registry, tmp_path):
    async def scenario():
        async with Harness(registry, tmp_path, "UnloadableEngine") as h:
            worker = h.pool.workers["w0"]
            await h.until(lambda: worker.state is WorkerState.FAILED, what="a failed worker")
            with pytest.raises(NotReady, match="sha256 mismatch"):
                await h.generate()
            assert worker.restarts == 0  # a start failure is deterministic: no restart loop

    asyncio.run(scenario())
