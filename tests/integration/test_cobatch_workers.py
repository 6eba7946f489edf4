"""Co-batching with real worker processes and pipes (fixture engines, no torch): the start-up proof decides."""

from __future__ import annotations

import asyncio

from app.api.schemas import GenerationRequest
from app.scheduler.dispatcher import Dispatcher
from app.services.generation import GenerationService
from app.worker.messages import WorkerConfig
from app.worker.pool import WorkerPool, WorkerState


async def generate_with(registry, tmp_path, engine: str, **fields):
    """Start one worker running `engine` (proving batches of 2..4), generate once; the outcome and /readyz's view."""
    config = WorkerConfig(
        "w0", "cpu", 1, True, tmp_path / "registry.yaml", tmp_path, ("sameseed-tiny",), False,
        log_level="warning", engine=f"tests.support.engines:{engine}", batch_sizes=(2, 3, 4), batch_proof_steps=2,
    )
    pool = WorkerPool([config], start_timeout_s=60.0)
    dispatcher = Dispatcher(pool=pool, max_queue=8, job_timeout_s=30.0, max_batch=4, batch_wait_s=0.0)
    service = GenerationService(registry=registry, default_model="sameseed-tiny", dispatcher=dispatcher)
    dispatcher.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while pool.workers["w0"].state is not WorkerState.READY:
            assert loop.time() < deadline, pool.workers["w0"].describe()
            await asyncio.sleep(0.02)
        request = GenerationRequest.model_validate({"prompt": "a cat", **fields})
        outcome = await service.generate(service.resolve(**request.param_fields()))
        return outcome, pool.workers["w0"].describe()
    finally:
        await dispatcher.close(stop_timeout_s=1.0)


def test_a_worker_whose_proof_holds_cobatches_and_one_whose_proof_finds_a_difference_runs_singles(registry, tmp_path):
    async def scenario():
        together, proven = await generate_with(registry, tmp_path, "CobatchingEngine", seed=5, num_images=4)
        alone, refused = await generate_with(registry, tmp_path, "BatchDependentEngine", seed=5, num_images=4)
        assert [i.cobatched_with for i in together.manifest.images] == [3, 3, 3, 3]
        assert all(v["proven"] for v in proven["cobatch"])
        # the batch-dependent machine: every size refused with the reason, every image made alone ...
        assert [i.cobatched_with for i in alone.manifest.images] == [0, 0, 0, 0]
        cases = {(v["guided"], v["size"]) for v in refused["cobatch"]}
        assert cases == {(guided, size) for guided in (True, False) for size in (2, 3, 4)}
        for verdict in refused["cobatch"]:
            tried = "" if verdict["size"] == 2 else "not tried: "  # a batch of 2 differed: larger ones are not tried
            first_difference = f"{tried}image 1 (seed 1) of a batch of 2 at 64x64"
            assert not verdict["proven"] and verdict["reason"].startswith(first_difference)
        # ... and both give the same bits: co-batching never changes an image
        assert [i.hash_fields() for i in together.manifest.images] == [i.hash_fields() for i in alone.manifest.images]

    asyncio.run(scenario())
