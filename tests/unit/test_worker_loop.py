"""The worker loop (`serve`) in a thread over a real pipe, with fixture engines: job errors are data."""

import threading
from multiprocessing import Pipe
from pathlib import Path

import pytest

from app.params import GenerationParams
from app.worker.messages import (
    ImageCanceled,
    ImageFailed,
    ImageRendered,
    ImageStep,
    RenderImage,
    Shutdown,
    WorkerConfig,
)
from app.worker.process import serve
from tests.support.engines import FakeEngine, OutOfMemoryEngine, RaisingEngine, SteppingEngine

CONFIG = WorkerConfig("w0", "cpu", 1, True, Path("registry.yaml"), Path("data"), ("sameseed-tiny",), False)
PARAMS = GenerationParams("sameseed-tiny", "a cat", "", 7, 20, 7.5, 64, 64, "pndm", 1)


@pytest.fixture()
def loop_with():
    threads = []

    def start(engine_class, cancel=None):
        parent, child = Pipe(duplex=True)
        thread = threading.Thread(target=serve, args=(engine_class(CONFIG), child, "w0", cancel), daemon=True)
        thread.start()
        threads.append((parent, thread))
        return parent

    yield start
    for parent, thread in threads:
        parent.send(Shutdown())
        thread.join(timeout=5)
        assert not thread.is_alive(), "the worker loop did not stop on Shutdown"


def ask(conn, message, timeout=5.0):
    conn.send(message)
    assert conn.poll(timeout), "no reply from the worker loop"
    return conn.recv()


def test_each_image_is_answered_with_its_index_seed_and_hashes(loop_with):
    conn = loop_with(FakeEngine)
    first = ask(conn, RenderImage("gen_1", 0, PARAMS))
    second = ask(conn, RenderImage("gen_1", 1, PARAMS.image(1)))
    assert isinstance(first, ImageRendered) and isinstance(second, ImageRendered)
    assert (first.image.index, first.image.seed, second.image.index, second.image.seed) == (0, 7, 1, 8)
    assert first.image.latent_sha256 != second.image.latent_sha256
    assert ask(conn, RenderImage("gen_2", 0, PARAMS)).image.latent_sha256 == first.image.latent_sha256


def test_a_pipeline_error_is_reported_and_the_loop_keeps_serving(loop_with):
    conn = loop_with(RaisingEngine)
    failed = ask(conn, RenderImage("gen_1", 0, GenerationParams(**{**PARAMS.as_dict(), "prompt": "raise"})))
    assert isinstance(failed, ImageFailed)
    assert (failed.job_id, failed.index, failed.error_type) == ("gen_1", 0, "generation_failed")
    assert "ValueError: the pipeline broke" in failed.message
    assert isinstance(ask(conn, RenderImage("gen_2", 0, PARAMS)), ImageRendered)


def test_out_of_memory_becomes_the_documented_error_naming_the_size(loop_with):
    conn = loop_with(OutOfMemoryEngine)
    big = GenerationParams(**{**PARAMS.as_dict(), "width": 128})
    failed = ask(conn, RenderImage("gen_1", 0, big))
    assert isinstance(failed, ImageFailed)
    assert (failed.error_type, failed.param) == ("out_of_memory", "width")
    assert "128x64" in failed.message and "4.00 GiB" in failed.message
    assert isinstance(ask(conn, RenderImage("gen_2", 0, PARAMS)), ImageRendered)  # still serving


def test_an_unknown_message_is_ignored_and_the_next_one_served(loop_with):
    conn = loop_with(FakeEngine)
    conn.send("not a message")
    assert isinstance(ask(conn, RenderImage("gen_1", 0, PARAMS)), ImageRendered)


def receive(conn, timeout=5.0):
    assert conn.poll(timeout), "no message from the worker loop"
    return conn.recv()


def test_every_step_is_reported_in_order_before_the_image(loop_with):
    conn = loop_with(SteppingEngine, threading.Event())
    conn.send(RenderImage("gen_1", 1, GenerationParams(**{**PARAMS.as_dict(), "steps": 4})))
    replies = [receive(conn) for _ in range(5)]
    assert [(r.job_id, r.index, r.step, r.steps) for r in replies[:4]] == [("gen_1", 1, k, 4) for k in (1, 2, 3, 4)]
    assert all(isinstance(r, ImageStep) for r in replies[:4]) and isinstance(replies[4], ImageRendered)


class GatedEngine(SteppingEngine):
    """Each step waits for the test to release it, so the test knows exactly which step the cancel met."""

    gate = threading.Semaphore(0)

    def render(self, job, on_step=None):
        for step in range(1, job.params.steps + 1):
            assert self.gate.acquire(timeout=5), "the test never released the step"
            on_step(step, job.params.steps)
        return FakeEngine.render(self, job)


def test_a_cancel_stops_the_image_at_the_next_step_and_the_loop_serves_the_next_one(loop_with):
    cancel = threading.Event()
    conn = loop_with(GatedEngine, cancel)
    conn.send(RenderImage("gen_1", 0, GenerationParams(**{**PARAMS.as_dict(), "steps": 1000})))
    GatedEngine.gate.release()
    first = receive(conn)
    assert isinstance(first, ImageStep) and first.step == 1
    cancel.set()  # as the parent does for the image in flight
    GatedEngine.gate.release()  # one more step runs ...
    stopped = receive(conn)  # ... and at its end the image stops: the worker is free within one step
    assert isinstance(stopped, ImageCanceled) and (stopped.job_id, stopped.index, stopped.steps_done) == ("gen_1", 0, 2)
    # the flag is cleared for the next image, which runs to the end
    conn.send(RenderImage("gen_2", 0, GenerationParams(**{**PARAMS.as_dict(), "steps": 2})))
    GatedEngine.gate.release(2)
    replies = [receive(conn) for _ in range(3)]
    assert [type(r) for r in replies] == [ImageStep, ImageStep, ImageRendered] and replies[-1].job_id == "gen_2"


class AlwaysPreviewEngine(SteppingEngine):
    """An engine that hands the listener a preview at every step, asked for or not: the loop decides what is sent."""

    def render(self, job, on_step=None):
        for step in range(1, job.params.steps + 1):
            on_step(step, job.params.steps, preview=b"\x89PNG preview %d" % step)
        return FakeEngine.render(self, job)


@pytest.mark.parametrize("engine", [SteppingEngine, AlwaysPreviewEngine])
def test_step_previews_are_sent_only_for_an_image_that_asked_for_them(loop_with, engine):
    conn = loop_with(engine, threading.Event())
    params = GenerationParams(**{**PARAMS.as_dict(), "steps": 3})
    conn.send(RenderImage("gen_1", 0, params))
    plain = [receive(conn) for _ in range(4)]
    conn.send(RenderImage("gen_2", 0, params, previews=True))
    watched = [receive(conn) for _ in range(4)]
    assert [type(r) for r in plain] == [type(r) for r in watched] == [ImageStep, ImageStep, ImageStep, ImageRendered]
    assert [r.preview_png for r in plain[:3]] == [None, None, None]
    assert all(isinstance(r.preview_png, bytes) and r.preview_png.startswith(b"\x89PNG") for r in watched[:3])
    assert len({r.preview_png for r in watched[:3]}) == 3  # one per step, not one repeated
    assert watched[3].image.latent_sha256 == plain[3].image.latent_sha256  # previews change nothing of the image
