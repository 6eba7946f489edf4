"""The dispatcher, the generation service and the golden-check monitor over a pool you drive by hand."""

import asyncio

import pytest

from app.api.schemas import GenerationRequest
from app.errors import (
    ClientDisconnected,
    GenerationFailed,
    InvalidRequest,
    JobTimeout,
    KeyUnavailable,
    ModelNotFound,
    NotReady,
    QueueFull,
    WorkerLost,
)
from app.params import MAX_SEED
from app.provenance.golden import BaselineStore, load_suite
from app.scheduler.dispatcher import Dispatcher
from app.services.consistency import ConsistencyMonitor
from app.services.generation import GenerationService, resolve_params
from app.telemetry.metrics import Metrics
from app.worker.messages import RenderImage, WorkerConfig
from app.worker.pool import WorkerState
from tests.support.fakes import FAKE_KEY, FakePool


def req(**fields):
    return GenerationRequest.model_validate({"prompt": "a cat", **fields})


def resolve_request(registry, default_model, request):
    return resolve_params(registry, default_model, **request.param_fields())


def configs(n):
    return [WorkerConfig(f"w{i}", "cpu", 1, True, "registry.yaml", "data", ("sameseed-tiny",), False) for i in range(n)]


class Harness:
    """A generation service over a real dispatcher and a FakePool; `generate` takes request fields."""

    def __init__(self, registry, workers=1, *, max_queue=4, timeout=5.0, consistency=None, start_timeout_s=300.0):
        self.pool = FakePool(configs(workers), start_timeout_s=start_timeout_s)
        self.dispatcher = Dispatcher(pool=self.pool, max_queue=max_queue, job_timeout_s=timeout)
        self.monitor = consistency
        if consistency is not None:
            consistency.attach(self.dispatcher)
        self.service = GenerationService(registry=registry, default_model="sameseed-tiny", dispatcher=self.dispatcher)
        self.metrics = self.dispatcher.metrics
        self.dispatcher.start()

    async def generate(self, request, *, disconnected=None):
        params = self.service.resolve(**request.param_fields())
        return await self.service.generate(
            params, reproducibility_key=request.reproducibility_key, disconnected=disconnected
        )

    def __getattr__(self, name):  # draining, ready(), waiting_jobs(), drain() ... of the dispatcher
        return getattr(self.dispatcher, name)


def make(registry, workers=1, **options):
    harness = Harness(registry, workers, **options)
    return harness, harness.pool


async def until(predicate, timeout=2.0):
    """Poll the event loop until predicate() holds (deadline, no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0)


def renders(pool):
    return [m for _, m in pool.sent if isinstance(m, RenderImage)]


# ----------------------------------------------------------------- resolve_request


def test_defaults_come_from_the_model(registry):
    effective = resolve_request(registry, "sameseed-tiny", req(seed=3))
    assert (effective.model, effective.width, effective.height, effective.steps, effective.sampler) == (
        "sameseed-tiny",
        64,
        64,
        20,
        "pndm",
    )
    assert effective.guidance_scale == 7.5 and effective.seed == 3


def test_unknown_model_is_404_naming_the_field(registry):
    with pytest.raises(ModelNotFound) as info:
        resolve_request(registry, "sameseed-tiny", req(model="sd-nope"))
    assert info.value.param == "model" and "sameseed-tiny" in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"width": 60}, "width"),
        ({"height": 1024}, "height"),
        ({"width": 512, "height": 512, "model": "sameseed-tiny"}, "width"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 31.0}, "guidance_scale"),
    ],
)
def test_model_limits_are_enforced_with_the_range(registry, fields, param):
    with pytest.raises(InvalidRequest) as info:
        resolve_request(registry, "sameseed-tiny", req(**fields))
    assert info.value.param == param and "got" in info.value.message


def test_seed_plus_images_must_stay_javascript_safe(registry):
    with pytest.raises(InvalidRequest) as info:
        resolve_request(registry, "sameseed-tiny", req(seed=MAX_SEED, num_images=2))
    assert info.value.param == "seed"


def test_a_drawn_seed_leaves_room_for_every_image(registry):
    for _ in range(50):
        effective = resolve_request(registry, "sameseed-tiny", req(num_images=8))
        assert 0 <= effective.seed and effective.seed + 7 <= MAX_SEED


# ----------------------------------------------------------------- routing and outcomes


def test_images_use_seed_plus_k_and_come_back_in_order(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0")
        pool.ready("w1")
        task = asyncio.create_task(dispatcher.generate(req(seed=10, num_images=3)))
        await until(lambda: len(renders(pool)) == 2)
        first, second = renders(pool)
        assert {first.params.seed, second.params.seed} == {10, 11}
        pool.answer("w1", second)  # finish out of order
        await until(lambda: len(renders(pool)) == 3)
        pool.answer("w0", first)
        pool.answer("w1", renders(pool)[2])
        outcome = await task
        assert [(i.image.index, i.image.seed) for i in outcome.images] == [(0, 10), (1, 11), (2, 12)]
        assert [i.seed for i in outcome.manifest.images] == [10, 11, 12]
        assert outcome.manifest.request.steps == 20 and outcome.manifest.request.num_images == 3

    asyncio.run(scenario())


def test_a_job_stays_inside_the_group_it_started_in(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0", group_key="A")
        pool.ready("w1", group_key="B")
        task = asyncio.create_task(dispatcher.generate(req(seed=1, num_images=2)))
        await until(lambda: len(renders(pool)) == 1)
        assert pool.sent[0][0] == "w0"
        assert pool.workers["w1"].state is WorkerState.READY  # the other group got nothing
        pool.answer("w0", renders(pool)[0])
        await until(lambda: len(renders(pool)) == 2)
        assert pool.sent[1][0] == "w0"
        pool.answer("w0", renders(pool)[1])
        await task

    asyncio.run(scenario())


def test_full_queue_answers_429_with_retry_after(registry):
    async def scenario():
        dispatcher, pool = make(registry, max_queue=2)
        tasks = [asyncio.create_task(dispatcher.generate(req(seed=s))) for s in range(2)]
        await until(lambda: dispatcher.waiting_jobs() == 2)
        with pytest.raises(QueueFull) as info:
            await dispatcher.generate(req(seed=9))
        assert int(info.value.headers()["Retry-After"]) >= 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert dispatcher.waiting_jobs() == 0  # cancelled requests free their places

    asyncio.run(scenario())


def test_dead_worker_image_is_retried_once_then_fails_503(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=5)))
        await until(lambda: len(renders(pool)) == 1)
        pool.die("w0")
        pool.ready("w0")  # restarted
        await until(lambda: len(renders(pool)) == 2)
        assert renders(pool)[1].params.seed == 5
        pool.die("w0")
        with pytest.raises(WorkerLost):
            await task

    asyncio.run(scenario())


def test_retry_after_death_gives_the_result(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=5)))
        await until(lambda: len(renders(pool)) == 1)
        pool.die("w0")
        pool.ready("w0")
        await until(lambda: len(renders(pool)) == 2)
        pool.answer("w0", renders(pool)[1])
        assert (await task).images[0].image.seed == 5

    asyncio.run(scenario())


def test_job_error_is_reported_and_the_worker_keeps_serving(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=5)))
        await until(lambda: len(renders(pool)) == 1)
        pool.fail("w0", renders(pool)[0])
        with pytest.raises(GenerationFailed):
            await task
        assert pool.workers["w0"].state is WorkerState.READY
        task = asyncio.create_task(dispatcher.generate(req(seed=6)))
        await until(lambda: len(renders(pool)) == 2)
        pool.answer("w0", renders(pool)[1])
        assert (await task).images[0].image.seed == 6

    asyncio.run(scenario())


def test_deadline_answers_timeout_and_drops_the_unstarted_job(registry):
    async def scenario():
        dispatcher, pool = make(registry, timeout=0.05)
        with pytest.raises(JobTimeout, match="never started"):
            await dispatcher.generate(req(seed=1))
        pool.ready("w0")
        assert renders(pool) == [] and dispatcher.waiting_jobs() == 0

    asyncio.run(scenario())


def test_no_usable_worker_is_503_with_the_reason(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.fail_start("w0", "sha256 mismatch")
        with pytest.raises(NotReady, match="sha256 mismatch"):
            await dispatcher.generate(req(seed=1))

    asyncio.run(scenario())


# ----------------------------------------------------------------- drain, disconnect, keys, metrics


def test_drain_refuses_new_work_and_lets_admitted_jobs_finish(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=1)))
        await until(lambda: len(renders(pool)) == 1)
        drain = asyncio.create_task(dispatcher.drain(5.0))
        await until(lambda: dispatcher.draining)
        assert not dispatcher.ready()
        with pytest.raises(NotReady, match="draining"):
            await dispatcher.generate(req(seed=2))
        pool.answer("w0", renders(pool)[0])
        assert (await task).images[0].image.seed == 1
        assert await drain == 0

    asyncio.run(scenario())


def test_drain_cuts_jobs_still_running_at_the_deadline(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=1)))
        await until(lambda: len(renders(pool)) == 1)
        assert await dispatcher.drain(0.05) == 1
        with pytest.raises(NotReady, match="shut down"):
            await task

    asyncio.run(scenario())


def test_a_disconnected_client_frees_its_place_in_the_queue(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        gone = asyncio.Event()

        async def disconnected():
            return gone.is_set()

        task = asyncio.create_task(dispatcher.generate(req(seed=1, num_images=3), disconnected=disconnected))
        await until(lambda: dispatcher.waiting_jobs() == 1)
        gone.set()
        with pytest.raises(ClientDisconnected):
            await task
        assert dispatcher.waiting_jobs() == 0
        pool.ready("w0")
        assert renders(pool) == []  # nothing of the abandoned job reaches a worker

    asyncio.run(scenario())


def test_a_request_naming_an_unknown_key_is_409_listing_the_known_ones(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0", group_key="A", models={"sameseed-tiny": {"reproducibility_key": "rk1-" + "a" * 64}})
        pool.ready("w1", group_key="B", models={"sameseed-tiny": {"reproducibility_key": "rk1-" + "b" * 64}})
        with pytest.raises(KeyUnavailable, match="rk1-aaaa"):
            await dispatcher.generate(req(seed=1, reproducibility_key="rk1-" + "c" * 64))
        task = asyncio.create_task(dispatcher.generate(req(seed=1, reproducibility_key="rk1-" + "b" * 64)))
        await until(lambda: len(renders(pool)) == 1)
        assert pool.sent[0][0] == "w1"
        pool.answer("w1", renders(pool)[0])
        await task

    asyncio.run(scenario())


def test_least_busy_idle_worker_gets_the_next_image(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0")
        pool.ready("w1")
        pool.workers["w0"].busy_s, pool.workers["w1"].busy_s = 10.0, 1.0  # as if w0 had rendered more
        task = asyncio.create_task(dispatcher.generate(req(seed=1)))
        await until(lambda: len(renders(pool)) == 1)
        assert pool.sent[0][0] == "w1"
        pool.answer("w1", renders(pool)[0])
        await task

    asyncio.run(scenario())


def test_metrics_count_outcomes_and_worker_states(registry):
    async def scenario():
        dispatcher, pool = make(registry)
        pool.ready("w0")
        task = asyncio.create_task(dispatcher.generate(req(seed=1)))
        await until(lambda: len(renders(pool)) == 1)
        pool.answer("w0", renders(pool)[0])
        await task
        with pytest.raises(InvalidRequest):
            await dispatcher.generate(req(width=63))
        return dispatcher.metrics

    metrics = asyncio.run(scenario())
    value = metrics.registry.get_sample_value
    assert value("sameseed_jobs_total", {"outcome": "ok"}) == 1
    assert value("sameseed_jobs_total", {"outcome": "invalid_request"}) == 1
    assert value("sameseed_worker_state", {"worker": "w0", "state": "ready"}) == 1
    assert value("sameseed_worker_images_total", {"worker": "w0"}) == 1
    assert value("sameseed_request_seconds_count") == 1


# ----------------------------------------------------------------- golden checks and quarantine

MODELS = {"sameseed-tiny": {"reproducibility_key": FAKE_KEY}}


async def answer_golden(pool, worker_id, salt=""):
    """Answer the golden images sent to one worker, one at a time as the dispatcher sends them."""
    answered = 0
    while True:
        await asyncio.sleep(0)
        open_ = [m for w, m in pool.sent if w == worker_id and m.job_id.startswith("golden_")][answered:]
        if not open_:
            return answered
        pool.answer(worker_id, open_[0], salt=salt)
        answered += 1


def monitor_for(registry, tmp_path, quarantine=True):
    return ConsistencyMonitor(
        suite=load_suite(), store=BaselineStore(tmp_path / "baselines.json"), registry=registry, metrics=Metrics(),
        interval_s=0, quarantine_on_drift=quarantine,
    )


def test_first_check_records_baselines_and_a_second_worker_is_judged_against_them(registry, tmp_path):
    async def scenario():
        monitor = monitor_for(registry, tmp_path)
        dispatcher, pool = make(registry, workers=2, consistency=monitor)
        pool.ready("w0", models=MODELS)
        assert await answer_golden(pool, "w0") == sum(c.cobatch for c in load_suite().for_family("sd1"))
        assert monitor.worker("w0").state == "baseline_recorded"
        pool.ready("w1", models=MODELS)
        await answer_golden(pool, "w1")
        assert monitor.worker("w1").state == "consistent"
        assert all(c.expected_latent_sha256 == c.actual_latent_sha256 for c in monitor.worker("w1").cases)

    asyncio.run(scenario())


def test_a_drifted_worker_is_quarantined_while_a_peer_is_consistent_and_returns_when_fixed(registry, tmp_path):
    async def scenario():
        monitor = monitor_for(registry, tmp_path)
        dispatcher, pool = make(registry, workers=2, consistency=monitor)
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        pool.ready("w1", models=MODELS)
        await answer_golden(pool, "w1", salt="bad gpu")
        cases = len(load_suite().for_family("sd1"))  # the co-batched case drifts with its single-run twin
        assert monitor.worker("w1").state == "drifted" and monitor.worker("w1").mismatches == cases
        assert pool.workers["w1"].state is WorkerState.QUARANTINED
        assert (
            monitor.metrics.registry.get_sample_value(
                "sameseed_consistency_state", {"worker": "w1", "state": "drifted"}
            )
            == 1
        )
        before = len(pool.sent)
        tasks = [asyncio.create_task(dispatcher.generate(req(seed=s))) for s in range(2)]
        for n in (1, 2):
            await until(lambda n=n: len(pool.sent) == before + n)
            pool.answer("w0", pool.sent[-1][1])
        await asyncio.gather(*tasks)
        assert {w for w, _ in pool.sent[before:]} == {"w0"}  # nothing reached the quarantined worker
        monitor.start_check(pool.workers["w1"])
        await answer_golden(pool, "w1")
        assert monitor.worker("w1").state == "consistent"
        assert pool.workers["w1"].state is WorkerState.READY

    asyncio.run(scenario())


def test_a_lone_drifted_worker_stays_in_rotation_visibly_drifted(registry, tmp_path):
    async def scenario():
        monitor = monitor_for(registry, tmp_path)
        dispatcher, pool = make(registry, consistency=monitor)
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        monitor.start_check(pool.workers["w0"])
        await answer_golden(pool, "w0", salt="driver update")
        assert monitor.worker("w0").state == "drifted"
        assert pool.workers["w0"].state is WorkerState.READY
        assert monitor.report(dispatcher.workers())["status"] == "drifted"

    asyncio.run(scenario())


def test_a_quarantined_worker_returns_to_rotation_when_its_consistent_peer_fails_for_good(registry, tmp_path):
    async def scenario():
        monitor = monitor_for(registry, tmp_path)
        dispatcher, pool = make(registry, workers=2, timeout=2.0, consistency=monitor)
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        pool.ready("w1", models=MODELS)
        await answer_golden(pool, "w1", salt="bad gpu")
        assert pool.workers["w1"].state is WorkerState.QUARANTINED
        pool.die("w0")  # restarting: w1 stays out of rotation, the peer is coming back
        assert pool.workers["w1"].state is WorkerState.QUARANTINED
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        pool.give_up("w0")  # crashed too often in a row: failed for good
        assert pool.workers["w1"].state is WorkerState.READY  # was: quarantined for good, every job hung to 504
        task = asyncio.create_task(dispatcher.generate(req(seed=1)))
        await until(lambda: renders(pool) and renders(pool)[-1].job_id.startswith("gen_"))
        pool.answer("w1", renders(pool)[-1])
        assert (await task).images[0].image.worker_id == "w1"

    asyncio.run(scenario())


def test_a_job_whose_group_fails_for_good_is_503_while_another_group_serves(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0", group_key="A")
        pool.ready("w1", group_key="B")
        task = asyncio.create_task(dispatcher.generate(req(seed=1, num_images=2)))
        await until(lambda: len(renders(pool)) == 1)
        (worker_id, _), = pool.sent
        pool.give_up(worker_id)
        with pytest.raises((NotReady, WorkerLost), match="gave up|died"):
            await asyncio.wait_for(task, timeout=2)

    asyncio.run(scenario())


def test_queue_position_counts_the_items_ahead_and_progress_reaches_the_item(registry):
    async def scenario():
        harness, pool = make(registry, workers=1)
        pool.ready("w0")
        seen = []
        works = [
            harness.service.submit(
                harness.service.resolve(prompt=p), on_progress=lambda w, kind, data: seen.append((w.id, kind, data))
            )
            for p in ("a", "b", "c")
        ]
        assert [harness.dispatcher.queue_position(w) for w in works] == [None, 1, 2]  # the first one started
        first = renders(pool)[0]
        pool.step("w0", first, 1, 20)
        pool.answer("w0", first)
        assert [harness.dispatcher.queue_position(w) for w in works] == [None, None, 1]
        assert [(wid, kind.value) for wid, kind, _ in seen] == [
            (works[0].id, "started"), (works[0].id, "step"), (works[0].id, "image"), (works[1].id, "started")
        ]
        assert seen[1][2] == {"index": 0, "worker": "w0", "step": 1, "steps": 20}

    asyncio.run(scenario())


def test_an_item_that_ends_early_stops_its_images_still_rendering_on_other_workers(registry):
    async def scenario():
        dispatcher, pool = make(registry, workers=2)
        pool.ready("w0")
        pool.ready("w1")
        task = asyncio.create_task(dispatcher.generate(req(num_images=2)))
        await until(lambda: len(renders(pool)) == 2)
        first, second = renders(pool)
        pool.fail("w0", first)  # one image fails: the job fails, its other image is of no use
        with pytest.raises(GenerationFailed):
            await task
        assert pool.cancels == ["w1"]
        pool.stop_canceled("w1", second, 5)
        assert pool.workers["w1"].state is WorkerState.READY

    asyncio.run(scenario())
