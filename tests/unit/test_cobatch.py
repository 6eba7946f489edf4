"""Co-batching in the dispatcher, the pool and the golden suite, over a pool you drive by hand; the proof with fakes."""

from __future__ import annotations

import asyncio
import threading
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.api.schemas import GenerationRequest
from app.errors import ClientDisconnected
from app.params import GenerationParams
from app.pipeline.batched import prove_batch_sizes
from app.provenance.golden import BaselineStore, load_suite
from app.scheduler.dispatcher import Dispatcher
from app.scheduler.work import Priority, Work
from app.services.consistency import ConsistencyMonitor
from app.services.generation import GenerationService
from app.telemetry.metrics import Metrics
from app.worker.messages import (
    ImageCanceled,
    ImageRendered,
    ImageStep,
    RenderBatch,
    RenderImage,
    Shutdown,
    WorkerConfig,
)
from app.worker.process import serve
from tests.support.engines import CobatchingEngine
from tests.support.fakes import FAKE_KEY, FakePool

MODELS = {"sameseed-tiny": {"reproducibility_key": FAKE_KEY}}


def proofs(proven=(2, 3, 4), refused=(), *, width=64, height=64, guided=True):
    """What a worker reports after its start-up proof: sizes proven bitwise, and sizes refused with a reason."""
    verdicts = [
        {"model": "sameseed-tiny", "width": width, "height": height, "guided": guided, "size": s, "proven": True,
         "reason": "", "seconds": 0.1}
        for s in proven
    ]
    verdicts += [
        {"model": "sameseed-tiny", "width": width, "height": height, "guided": guided, "size": s, "proven": False,
         "reason": f"image 1 (seed 1) of a batch of {s}: latents differ from its single run", "seconds": 0.1}
        for s in refused
    ]
    return tuple(verdicts)


class Harness:
    """A generation service over a real dispatcher (co-batching on) and a FakePool."""

    def __init__(self, registry, *, workers=1, auto=False, max_batch=4, batch_wait_s=0.0, monitor=None):
        configs = [
            WorkerConfig(f"w{i}", "cpu", 1, True, "registry.yaml", "data", ("sameseed-tiny",), False)
            for i in range(workers)
        ]
        self.pool = FakePool(configs, auto=auto)
        self.dispatcher = Dispatcher(
            pool=self.pool, max_queue=16, job_timeout_s=10.0, max_batch=max_batch, batch_wait_s=batch_wait_s
        )
        if monitor is not None:
            monitor.attach(self.dispatcher)
        self.service = GenerationService(registry=registry, default_model="sameseed-tiny", dispatcher=self.dispatcher)
        self.dispatcher.start()

    async def ready(self, worker_id="w0", **report):
        """The worker reports ready with `report` (after the auto pool's own plain ready, which it replaces)."""
        await asyncio.sleep(0)
        self.pool.ready(worker_id, **report)

    def generate(self, **fields):
        request = GenerationRequest.model_validate({"prompt": "a cat", **fields})
        return asyncio.create_task(self.service.generate(self.service.resolve(**request.param_fields())))

    def sent(self, kind=None):
        return [m for _, m in self.pool.sent if kind is None or isinstance(m, kind)]


async def until(predicate, timeout=2.0):
    """Run the event loop until predicate() holds (a deadline, no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


def test_the_images_of_one_request_run_as_one_cobatched_call_and_come_back_per_image(registry):
    async def scenario():
        h = Harness(registry, auto=True)
        await h.ready(cobatch=proofs())
        outcome = await h.generate(seed=10, num_images=4)
        (batch,) = h.sent()
        assert isinstance(batch, RenderBatch) and [(m.index, m.params.seed) for m in batch.images] == [
            (k, 10 + k) for k in range(4)
        ]
        assert [(i.image.index, i.image.seed) for i in outcome.images] == [(k, 10 + k) for k in range(4)]
        # the manifest says each image shared its call with three others (not a key field)
        assert [i.cobatched_with for i in outcome.manifest.images] == [3, 3, 3, 3]
        assert h.pool.workers["w0"].jobs_done == 4 and h.pool.workers["w0"].in_flight is None
        metrics = h.dispatcher.metrics.registry
        assert metrics.get_sample_value("sameseed_cobatched_images_total", {"model": "sameseed-tiny"}) == 4

    asyncio.run(scenario())


def test_idle_workers_split_a_request_into_cobatched_calls_rather_than_one_worker_taking_all(registry):
    async def scenario():
        h = Harness(registry, workers=2, auto=True)
        await h.ready("w0", cobatch=proofs())
        await h.ready("w1", cobatch=proofs())
        outcome = await h.generate(seed=10, num_images=4)
        calls = [(w, [m.index for m in b.images]) for w, b in h.pool.sent]
        assert calls == [("w0", [0, 1]), ("w1", [2, 3])]
        assert [i.cobatched_with for i in outcome.manifest.images] == [1, 1, 1, 1]

    asyncio.run(scenario())


def test_incompatible_requests_are_never_batched_together(registry):
    async def scenario():
        h = Harness(registry)
        await h.ready(cobatch=proofs() + proofs((2, 3, 4), guided=False) + proofs(width=128))
        first = h.generate(seed=1)  # keeps the worker busy while the rest queue up
        await until(lambda: len(h.sent()) == 1)
        variants = [
            {}, {"seed": 20}, {"steps": 5}, {"sampler": "euler"}, {"guidance_scale": 5.0},
            {"guidance_scale": 0.0}, {"width": 128}, {"negative_prompt": "blurry"}, {"prompt": "a dog"},
        ]
        tasks = [h.generate(**{"seed": 30 + k, **v}) for k, v in enumerate(variants)]
        await until(lambda: h.dispatcher.waiting_jobs() == len(variants))
        answered = 0
        while answered < 1 + len(variants):
            await until(lambda: h.pool.workers["w0"].in_flight is not None)
            message = h.pool.workers["w0"].in_flight
            for image in message.images:
                h.pool.answer("w0", image, "", len(message.images) - 1)
                answered += 1
        await asyncio.gather(first, *tasks)
        batches = h.sent(RenderBatch)
        for batch in batches:  # every call held one kind of work
            assert len({m.params.cobatch_key() for m in batch.images}) == 1
        # the compatible ones (same model, size, steps, sampler, guidance; prompts and seeds may differ) went together
        assert [sorted(m.params.seed for m in b.images) for b in batches] == [[20, 30, 38]]
        assert len(h.sent(RenderImage)) == 1 + len(variants) - 3

    asyncio.run(scenario())


def test_a_worker_that_proved_nothing_gets_every_image_alone(registry):
    async def scenario():
        h = Harness(registry, auto=True)
        await h.ready()  # an engine without a co-batched path, or a proof that failed for every size
        await h.generate(seed=1, num_images=3)
        assert len(h.sent(RenderImage)) == 3 and not h.sent(RenderBatch)

    asyncio.run(scenario())


def test_only_batch_sizes_the_worker_proved_are_used_and_unproven_shapes_run_singly(registry):
    async def scenario():
        h = Harness(registry, auto=True)
        await h.ready(cobatch=proofs(proven=(2,), refused=(3, 4)))
        outcome = await h.generate(seed=1, num_images=3)
        assert [len(b.images) for b in h.sent(RenderBatch)] == [2] and len(h.sent(RenderImage)) == 1
        assert [i.cobatched_with for i in outcome.manifest.images] == [1, 1, 0]
        await h.generate(seed=5, num_images=2, width=96)  # a shape the worker never proved
        assert [len(b.images) for b in h.sent(RenderBatch)] == [2] and len(h.sent(RenderImage)) == 3

    asyncio.run(scenario())


def test_a_lone_request_never_waits_on_an_idle_server_and_at_most_the_configured_time_in_a_burst(registry):
    async def scenario():
        h = Harness(registry, workers=2, max_batch=2, batch_wait_s=60.0)
        await h.ready("w0", cobatch=proofs(proven=(2,)))
        await h.ready("w1", cobatch=proofs(proven=(2,)))
        h.generate(seed=1)
        await until(lambda: len(h.sent(RenderImage)) == 1)  # an idle server: it starts at once, alone
        h.generate(seed=2)  # a burst (w0 is busy): w1 holds it for company, up to the wait
        await asyncio.sleep(0.01)
        assert len(h.sent()) == 1
        h.generate(seed=3)
        await until(lambda: len(h.sent()) == 2)
        assert [m.params.seed for m in h.sent(RenderBatch)[0].images] == [2, 3]

        brief = Harness(registry, workers=2, max_batch=2, batch_wait_s=0.02)
        await brief.ready("w0", cobatch=proofs(proven=(2,)))
        await brief.ready("w1", cobatch=proofs(proven=(2,)))
        brief.generate(seed=1)
        await until(lambda: len(brief.sent()) == 1)
        brief.generate(seed=2)  # in a burst, with no company coming: alone once its wait is over
        await until(lambda: len(brief.sent(RenderImage)) == 2, timeout=5)
        assert not brief.sent(RenderBatch)

    asyncio.run(scenario())


def test_canceling_one_job_of_a_batch_reruns_the_images_of_the_others(registry):
    async def scenario():
        h = Harness(registry, max_batch=2, batch_wait_s=60.0)
        await h.ready(cobatch=proofs(proven=(2,)))
        blocker = h.generate(seed=9)
        await until(lambda: len(h.sent()) == 1)
        leaving = h.generate(seed=1)
        staying = h.generate(seed=2)
        await until(lambda: h.dispatcher.waiting_jobs() == 2)
        h.pool.answer("w0", h.sent()[0])
        await blocker
        await until(lambda: len(h.sent(RenderBatch)) == 1)
        (job_a, _), (job_b, _) = [(m.job_id, m.index) for m in h.sent(RenderBatch)[0].images]
        work_a = h.dispatcher._works[job_a]
        h.dispatcher.cancel(work_a, ClientDisconnected("gone"))
        assert h.pool.cancels == ["w0"]  # the whole call stops at its next step
        for image in h.sent(RenderBatch)[0].images:
            h.pool.stop_canceled("w0", image, 3)
        await until(lambda: len(h.sent()) == 3)
        rerun = h.sent()[-1]  # only the image still wanted, alone (a re-run does not wait for company again)
        assert isinstance(rerun, RenderImage) and rerun.job_id == job_b
        h.pool.answer("w0", rerun)
        assert (await staying).images[0].image.seed == 2
        with pytest.raises(ClientDisconnected):
            await leaving

    asyncio.run(scenario())


def test_a_worker_dying_mid_batch_retries_every_image_it_had_not_answered(registry):
    async def scenario():
        h = Harness(registry)
        await h.ready(cobatch=proofs(proven=(3,)))
        task = h.generate(seed=1, num_images=3)
        await until(lambda: len(h.sent(RenderBatch)) == 1)
        batch = h.sent(RenderBatch)[0]
        h.pool.answer("w0", batch.images[0], "", 2)  # one image made it out before the crash
        assert h.pool.workers["w0"].in_flight is not None  # still busy with the other two
        h.pool.die("w0")
        await h.ready(cobatch=proofs(proven=(2,)))
        await until(lambda: len(h.sent()) == 2)
        retry = h.sent()[-1]
        assert isinstance(retry, RenderBatch) and [m.index for m in retry.images] == [1, 2]
        h.pool.answer_batch("w0", retry)
        outcome = await task
        assert [i.image.index for i in outcome.images] == [0, 1, 2]
        assert h.dispatcher.metrics.registry.get_sample_value("sameseed_image_retries_total") == 2

    asyncio.run(scenario())


def test_preview_jobs_and_solo_images_are_never_cobatched(registry):
    async def scenario():
        h = Harness(registry, auto=True)
        await h.ready(cobatch=proofs())
        params = GenerationParams("sameseed-tiny", "a cat", "", 1, 20, 7.5, 64, 64, "pndm", 1)
        images = tuple(params.image(k) for k in range(3))
        for work in (Work("job_previews", images, previews=True), Work("job_solo", images, solo=frozenset({0, 1, 2}))):
            h.dispatcher.submit(work)
            await asyncio.wait_for(work.done.wait(), 2)
        assert not h.sent(RenderBatch) and len(h.sent(RenderImage)) == 6

    asyncio.run(scenario())


def test_readyz_and_the_metrics_say_why_a_size_is_not_cobatched(registry):
    async def scenario():
        h = Harness(registry)
        await h.ready(cobatch=proofs(proven=(2,), refused=(3,)))
        described = {v["size"]: v for v in h.pool.workers["w0"].describe()["cobatch"]}
        assert described[2]["proven"] and not described[3]["proven"]
        assert "latents differ" in described[3]["reason"]
        h.dispatcher.refresh_metrics()
        labels = {"worker": "w0", "model": "sameseed-tiny", "shape": "64x64", "guided": "true"}
        metrics = h.dispatcher.metrics.registry
        assert metrics.get_sample_value("sameseed_cobatch_proven", {**labels, "batch_size": "2", "reason": ""}) == 1
        refused = {**labels, "batch_size": "3", "reason": described[3]["reason"]}
        assert metrics.get_sample_value("sameseed_cobatch_proven", refused) == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------- the golden suite's co-batched case


def monitor_for(registry, tmp_path):
    return ConsistencyMonitor(
        suite=load_suite(), store=BaselineStore(tmp_path / "baselines.json"), registry=registry, metrics=Metrics(),
        interval_s=0, quarantine_on_drift=True,
    )


async def answer_golden(h, salt_batches=""):
    """Answer every call the worker gets, in order; a co-batched call's images with `salt_batches` in their hashes."""
    answered = 0
    while True:
        await asyncio.sleep(0)
        calls = h.sent()
        if answered == len(calls):
            return
        call = calls[answered]
        if isinstance(call, RenderBatch):
            for image in call.images:
                h.pool.answer("w0", image, salt_batches, len(call.images) - 1)
        else:
            h.pool.answer("w0", call)
        answered += 1


def test_the_golden_cobatched_case_runs_in_one_call_and_must_give_its_single_twins_hashes(registry, tmp_path):
    async def scenario():
        monitor = monitor_for(registry, tmp_path)
        h = Harness(registry, monitor=monitor)
        await h.ready(models=MODELS, cobatch=proofs(proven=(2,)))
        await answer_golden(h)
        (batch,) = h.sent(RenderBatch)
        assert [m.params.seed for m in batch.images] == [1, 2]  # the case (pndm-default's image) and a companion
        assert all(m.check for m in batch.images)
        cases = {c.case: c for c in monitor.worker("w0").cases}
        twin = cases["pndm-default-cobatched"]
        assert twin.cobatched_with == 1 and twin.state == "consistent"
        assert twin.actual_latent_sha256 == cases["pndm-default"].actual_latent_sha256
        assert monitor.worker("w0").state == "baseline_recorded"
        # a later run whose co-batched image differs from the single run's baseline drifts
        monitor.start_check(h.pool.workers["w0"])
        await answer_golden(h, salt_batches="batch-dependent kernel")
        cases = {c.case: c for c in monitor.worker("w0").cases}
        assert cases["pndm-default-cobatched"].state == "drifted" and cases["pndm-default"].state == "consistent"

    asyncio.run(scenario())


def test_golden_single_cases_are_never_cobatched(registry, tmp_path):
    monitor = monitor_for(registry, tmp_path)
    items, images = monitor.plan(["sameseed-tiny"])
    cobatched = [i for i, (case, _) in enumerate(items) if case.cobatch > 1]
    assert [images[i].seed for i in cobatched] == [1, 2]
    assert Work("golden", tuple(images), priority=Priority.CHECK, solo=frozenset(
        i for i, (case, _) in enumerate(items) if case.cobatch == 1
    )).cobatchable(cobatched[0])


# ----------------------------------------------------------------- the proof, with fake renders


def fake_model():
    defaults = SimpleNamespace(width=64, height=64, steps=20, guidance_scale=7.5, sampler="pndm")
    return SimpleNamespace(entry=SimpleNamespace(id="sameseed-tiny", defaults=defaults))


def fake_render(params, salt=""):
    key = (params.prompt, params.seed, params.steps, params.guidance_scale, salt)
    return SimpleNamespace(latent_sha256=f"{hash(key) & 0xFFFFFFFF:064x}", pixel_sha256=f"{hash(key[:-1]):064x}")


def test_the_proof_refuses_a_batch_size_whose_images_differ_naming_the_first_image():
    def differs_at_three(model, batch):
        return [fake_render(p, salt="3-row kernel" if len(batch) == 3 and k == 1 else "") for k, p in enumerate(batch)]

    verdicts = prove_batch_sizes(
        fake_model(), (2, 3, 4, 1), steps=2, guidance_scales=(None, 0.0),
        render_one=lambda model, p: fake_render(p), render_many=differs_at_three,
    )
    found = {(v.guided, v.size): v for v in verdicts}
    assert sorted(found) == [(False, 2), (False, 3), (False, 4), (True, 2), (True, 3), (True, 4)]
    assert found[(True, 2)].proven and found[(False, 2)].proven
    refused = found[(True, 3)]
    assert not refused.proven and refused.reason.startswith("image 1 (seed 1) of a batch of 3 at 64x64, guidance 7.5")
    assert "latents differ" in refused.reason and "guidance 0" in found[(False, 3)].reason
    # a larger size of a mode where a smaller one differed is not tried: unproven, so it runs singly
    assert not found[(True, 4)].proven and found[(True, 4)].reason == f"not tried: {refused.reason}"


def test_a_batch_that_raises_is_not_proven():
    def raises(model, batch):
        raise RuntimeError("no kernel for this shape")

    (verdict,) = prove_batch_sizes(
        fake_model(), (2,), render_one=lambda model, p: fake_render(p), render_many=raises
    )
    assert not verdict.proven and "raised RuntimeError: no kernel for this shape" in verdict.reason


# ----------------------------------------------------------------- the worker loop, in a thread over a real pipe


class AlwaysCanceled:
    """A cancel flag the parent keeps setting (the loop clears it before each call; here it stays set)."""

    def is_set(self) -> bool:
        return True

    def clear(self) -> None:
        pass


def run_loop(batch, cancel=None):
    """Serve one co-batched call on a CobatchingEngine that proved sizes 2 and 3; every reply until the last image's."""
    engine = CobatchingEngine(WorkerConfig("w0", "cpu", 1, True, Path("r.yaml"), Path("d"), ("sameseed-tiny",), False))
    engine.prove_batches("sameseed-tiny", (2, 3), 2)
    parent, child = Pipe(duplex=True)
    thread = threading.Thread(target=serve, args=(engine, child, "w0", cancel), daemon=True)
    thread.start()
    parent.send(batch)
    replies = []
    while sum(not isinstance(r, ImageStep) for r in replies) < len(batch.images):
        assert parent.poll(5), f"no reply from the worker loop after {replies}"
        replies.append(parent.recv())
    parent.send(Shutdown())
    thread.join(timeout=5)
    return replies


def test_the_worker_loop_answers_each_image_of_a_call_and_reports_its_steps_per_image():
    params = GenerationParams("sameseed-tiny", "a cat", "", 7, 20, 7.5, 64, 64, "pndm", 1)
    batch = RenderBatch((RenderImage("gen_a", 0, params), RenderImage("gen_a", 1, params.image(1)),
                         RenderImage("gen_b", 0, params.image(5))))
    replies = run_loop(batch)
    steps = [(r.job_id, r.index) for r in replies if isinstance(r, ImageStep)]
    assert steps == [("gen_a", 0), ("gen_a", 1), ("gen_b", 0)]
    images = [r for r in replies if isinstance(r, ImageRendered)]
    assert [(r.job_id, r.image.index, r.image.seed, r.image.cobatched_with) for r in images] == [
        ("gen_a", 0, 7, 2), ("gen_a", 1, 8, 2), ("gen_b", 0, 12, 2)
    ]


def test_a_canceled_call_answers_every_image_canceled():
    params = GenerationParams("sameseed-tiny", "a cat", "", 7, 20, 7.5, 64, 64, "pndm", 1)
    batch = RenderBatch((RenderImage("gen_a", 0, params), RenderImage("gen_b", 0, params.image(1))))
    replies = run_loop(batch, AlwaysCanceled())
    assert [(type(r), r.job_id, r.index) for r in replies] == [(ImageCanceled, "gen_a", 0), (ImageCanceled, "gen_b", 0)]
