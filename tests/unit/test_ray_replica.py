"""The Ray Serve replica class without Ray: its start-up answer, streamed steps, cancels, one torch thread."""

import asyncio
import threading

import pytest

from app.params import GenerationParams
from app.worker.messages import ImageCanceled, ImageRendered, ImageStep, RenderImage, WorkerConfig, WorkerFailed
from app.worker.ray_replica import SameseedReplica
from tests.support.engines import SteppingEngine

IDENTITY = "10.0.0.7/w1#abc123"


class ThreadEngine(SteppingEngine):
    """Records the thread of its load and of every render."""

    threads: list[int] = []

    def __init__(self, config):
        super().__init__(config)
        ThreadEngine.threads = [threading.get_ident()]

    def render(self, job, on_step=None):
        ThreadEngine.threads.append(threading.get_ident())
        return super().render(job, on_step)


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """The replica sets torch's environment at start; give this process its own back afterwards."""
    for name in ("CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "unchanged")


def replica(engine="tests.unit.test_ray_replica:ThreadEngine"):
    config = WorkerConfig("w1", "cpu", 1, True, "registry.yaml", "data", ("sameseed-tiny",), False, engine=engine)
    return SameseedReplica(config, identity=IDENTITY)


def message(job_id="gen_1", steps=3):
    params = GenerationParams(
        model="sameseed-tiny", prompt="a cat", negative_prompt="", seed=5, steps=steps, guidance_scale=7.5,
        width=64, height=64, sampler="pndm", num_images=1,
    )
    return RenderImage(job_id, 0, params)


async def collect(stream, on_event=None):
    events = []
    async for event in stream:
        events.append(event)
        if on_event is not None:
            await on_event(event)
    return events


def test_a_replica_reports_ready_under_its_node_and_replica_name_and_streams_steps_then_the_image():
    async def scenario():
        worker = replica()
        ready = await worker.ready()
        assert ready.worker_id == IDENTITY and ready.models["sameseed-tiny"]["reproducibility_key"]
        events = await collect(worker.render(message(steps=3)))
        assert [type(e) for e in events] == [ImageStep, ImageStep, ImageStep, ImageRendered]
        assert [e.step for e in events[:3]] == [1, 2, 3] and events[-1].image.worker_id == IDENTITY
        await collect(worker.render(message("gen_2")))
        loader, *renders = ThreadEngine.threads
        assert renders and set(renders) == {loader} != {threading.get_ident()}  # all torch work: one own thread

    asyncio.run(scenario())


def test_a_cancel_stops_its_own_image_at_the_next_step_and_a_late_one_stops_nothing():
    async def scenario():
        worker = replica()
        await worker.ready()

        async def cancel_at_step_two(event):
            if isinstance(event, ImageStep) and event.step == 2:
                await worker.cancel("gen_other")  # a late cancel of an image already finished
                await worker.cancel("gen_1")

        events = await collect(worker.render(message("gen_1", steps=50)), cancel_at_step_two)
        assert isinstance(events[-1], ImageCanceled) and events[-1].steps_done < 50
        await worker.cancel("gen_1")  # arrives after its image ended: the next image is untouched
        after = await collect(worker.render(message("gen_2", steps=3)))
        assert isinstance(after[-1], ImageRendered)

    asyncio.run(scenario())


def test_a_replica_that_cannot_load_its_model_answers_worker_failed():
    async def scenario():
        answer = await replica("tests.support.engines:UnloadableEngine").ready()
        assert isinstance(answer, WorkerFailed) and answer.error_type == "model_unavailable"
        assert answer.worker_id == IDENTITY

    asyncio.run(scenario())
