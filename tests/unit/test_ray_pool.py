"""The Ray Serve pool under the real dispatcher, over a fake Serve you drive by hand (no Ray, no torch).

What is proven here: key-group routing and spreading over replicas, the retry of an image whose
replica died and the slot's healing, a replica replaced between images, backpressure, cancels,
and the drain that deletes every slot. tests/ray/ runs the same paths on a real Ray cluster.
"""

import asyncio
import hashlib

import pytest

from app.errors import JobTimeout, QueueFull
from app.provenance.golden import BaselineStore, load_suite
from app.scheduler.dispatcher import Dispatcher
from app.scheduler.work import Work, WorkState
from app.services.consistency import ConsistencyMonitor
from app.services.generation import resolve_params
from app.telemetry.metrics import Metrics
from app.worker.messages import ImageCanceled, ImageFailed, ImageRendered, ImageStep, WorkerConfig, WorkerReady
from app.worker.pool import WorkerState
from app.worker.ray_pool import RayPool, plan_replicas
from tests.support.fakes import RUNTIME, rendered

MODEL = "sameseed-tiny"


def group_key(group):
    """The reproducibility key of the tiny model on a group's hardware."""
    return "rk1-" + hashlib.sha256(group.encode()).hexdigest()


class ReplicaDied(Exception):
    """What a Serve handle raises for a replica that is gone (ActorDiedError there)."""


class FakeReplica:
    def __init__(self, worker_id, group):
        self.worker_id, self.group, self.alive = worker_id, group, True
        self.open: list[tuple] = []  # (message, queue) of streams in flight
        self.finished: list = []  # messages answered, their events maybe not read yet
        self.salt = ""  # another salt: this replica's hardware gives other bits (a drifted driver)


class FakeServe:
    """Slots and their replicas: the test starts, finishes, kills and replaces replicas."""

    def __init__(self):
        self.replicas: dict[str, FakeReplica | None] = {}
        self.deployed: list[str] = []
        self.deleted: list[str] = []
        self.cancels: list[tuple[str, str]] = []
        self.lives = 0

    # ------------------------------------------------------------ the backend interface
    def deploy(self, configs):
        self.deployed = [c.worker_id for c in configs]
        for c in configs:
            self.replicas.setdefault(c.worker_id, None)

    async def ready(self, slot):
        replica = self.replicas.get(slot)
        if replica is None or not replica.alive:
            raise ReplicaDied(slot)
        key = group_key(replica.group)
        return WorkerReady(replica.worker_id, 1000 + self.lives, dict(RUNTIME), replica.group,
                           {MODEL: {"reproducibility_key": key}}, 0.1)

    async def render(self, slot, message):
        replica = self.replicas[slot]
        if replica is None or not replica.alive:
            raise ReplicaDied(slot)
        queue = asyncio.Queue()
        replica.open.append((message, queue))
        while True:
            event = await queue.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, ImageRendered | ImageFailed | ImageCanceled):
                replica.open.remove((message, queue))
                return

    async def cancel(self, slot, job_id):
        self.cancels.append((slot, job_id))
        for message, queue in self.replicas[slot].open:
            if message.job_id == job_id:
                queue.put_nowait(ImageCanceled(job_id, message.index, slot, 1))

    def delete(self, slots):
        self.deleted.extend(slots)

    # ------------------------------------------------------------ what the test drives
    def up(self, slot, group="g1", node="10.0.0.1"):
        """Serve (re)starts the slot's replica."""
        self.lives += 1
        self.replicas[slot] = FakeReplica(f"{node}/{slot}#r{self.lives}", group)
        return self.replicas[slot]

    def rendering(self):
        """Slot -> images its replica is rendering and the test has not finished yet."""
        busy = {slot: [m for m, _ in r.open if m not in r.finished] for slot, r in self.replicas.items() if r}
        return {slot: messages for slot, messages in busy.items() if messages}

    def finish(self, slot):
        """The slot's replica finishes its image (one step event first)."""
        replica = self.replicas[slot]
        message, queue = next((m, q) for m, q in replica.open if m not in replica.finished)
        replica.finished.append(message)
        queue.put_nowait(ImageStep(message.job_id, message.index, replica.worker_id, 1, 1))
        queue.put_nowait(rendered(message, replica.worker_id, key=group_key(replica.group), salt=replica.salt))

    def kill(self, slot):
        """SIGKILL: the streams in flight end with an error; the slot has no replica until `up` again."""
        replica = self.replicas[slot]
        replica.alive = False
        for _, queue in replica.open:
            queue.put_nowait(ReplicaDied(slot))


def configs(n):
    return [WorkerConfig(f"w{i}", "cpu", 1, True, "registry.yaml", "data", (MODEL,), False) for i in range(n)]


async def until(predicate, timeout=3.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


def work(registry, images=1, **fields):
    params = resolve_params(registry, MODEL, prompt="a cat", seed=10, num_images=images)
    return Work(id=f"gen_{id(params)}", images=tuple(params.image(k) for k in range(images)), **fields)


def cluster(slots, *, groups=None, max_queue=4, timeout=10.0):
    serve = FakeServe()
    pool = RayPool(configs(slots), serve, probe_s=0.02, retry_s=0.01).launch()
    dispatcher = Dispatcher(pool=pool, max_queue=max_queue, job_timeout_s=timeout)
    for i in range(slots):
        serve.up(f"w{i}", (groups or {}).get(f"w{i}", "g1"), node=f"10.0.0.{i + 1}")
    dispatcher.start()
    return serve, pool, dispatcher


async def answer_until(serve, predicate, timeout=3.0):
    """Every replica finishes whatever it renders, until predicate() holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached before the deadline"
        for slot in serve.rendering():
            serve.finish(slot)
        await asyncio.sleep(0.005)


def serving(pool, *ids):
    return all(pool.workers[i].state is WorkerState.READY for i in ids)


def test_replicas_of_one_key_group_share_an_n_image_request_and_report_node_and_replica(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(3, groups={"w2": "g2"})
        await until(lambda: serving(pool, "w0", "w1", "w2"))
        assert serve.deployed == ["w0", "w1", "w2"]
        assert {w.id: w.group_key for w in pool.handles()} == {"w0": "g1", "w1": "g1", "w2": "g2"}
        job = dispatcher.submit(work(registry, images=3))
        await until(lambda: len(serve.rendering()) == 2)
        assert set(serve.rendering()) == {"w0", "w1"}  # w2 is another key group: never mixed in
        while not job.finished:
            for slot in serve.rendering():
                serve.finish(slot)
            await asyncio.sleep(0.005)
        assert job.state is WorkState.SUCCEEDED
        workers = [r.image.worker_id for r in job.ordered_results()]
        assert set(workers) == {"10.0.0.1/w0#r1", "10.0.0.2/w1#r2"}
        assert {r.runtime["reproducibility_key"] for r in job.ordered_results()} == {group_key("g1")}
        assert job.steps_done == {0: 20, 1: 20, 2: 20}

    asyncio.run(scenario())


def test_a_request_pinned_to_a_key_runs_on_a_replica_of_that_key_on_any_node(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(3, groups={"w0": "g1", "w1": "g1", "w2": "g2"})
        await until(lambda: serving(pool, "w0", "w1", "w2"))
        group = dispatcher.group_for_key(MODEL, group_key("g2"))
        job = dispatcher.submit(work(registry, images=2, group_key=group))
        for _ in range(2):
            await until(lambda: "w2" in serve.rendering())
            assert set(serve.rendering()) == {"w2"}
            serve.finish("w2")
        await until(lambda: job.finished)
        assert {r.image.worker_id for r in job.results.values()} == {"10.0.0.3/w2#r3"}

    asyncio.run(scenario())


def test_a_replica_killed_mid_image_is_retried_once_on_its_group_and_the_slot_heals(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(2)
        await until(lambda: serving(pool, "w0", "w1"))
        job = dispatcher.submit(work(registry))
        await until(lambda: "w0" in serve.rendering())
        serve.kill("w0")
        await until(lambda: "w1" in serve.rendering())  # the image, sent again to the other replica
        assert pool.workers["w0"].state in (WorkerState.RESTARTING, WorkerState.STARTING)
        assert "replica 10.0.0.1/w0#r1 lost" in pool.workers["w0"].last_error
        assert dispatcher.metrics.retries._value.get() == 1
        serve.finish("w1")
        await until(lambda: job.finished)
        assert job.state is WorkState.SUCCEEDED and job.attempts == {0: 2}
        serve.up("w0", node="10.0.0.9")  # Serve starts a replacement, maybe on another node
        await until(lambda: serving(pool, "w0"))
        assert pool.workers["w0"].restarts == 1
        assert pool.workers["w0"].runtime == RUNTIME

    asyncio.run(scenario())


def test_an_image_whose_replica_dies_twice_fails_with_worker_lost(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(1)
        await until(lambda: serving(pool, "w0"))
        job = dispatcher.submit(work(registry))
        await until(lambda: "w0" in serve.rendering())
        serve.kill("w0")
        serve.up("w0")
        await until(lambda: "w0" in serve.rendering(), timeout=5.0)  # after the restart backoff
        serve.kill("w0")
        await until(lambda: job.finished)
        assert job.state is WorkState.FAILED and job.error.type == "worker_lost"

    asyncio.run(scenario())


def test_an_idle_replica_replaced_between_images_is_seen_by_the_probe(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(1)
        await until(lambda: serving(pool, "w0"))
        serve.up("w0", node="10.0.0.5")  # died and was replaced while idle: only the probe can tell
        await until(lambda: pool.workers["w0"].restarts == 1 and serving(pool, "w0"), timeout=5.0)
        job = dispatcher.submit(work(registry))
        await until(lambda: "w0" in serve.rendering())
        serve.finish("w0")
        await until(lambda: job.finished)
        assert job.results[0].image.worker_id == "10.0.0.5/w0#r2"

    asyncio.run(scenario())


def test_a_full_queue_answers_429_with_retry_after(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(1, max_queue=1)
        await until(lambda: serving(pool, "w0"))
        dispatcher.submit(work(registry))  # running
        dispatcher.submit(work(registry))  # waiting: the queue is full
        with pytest.raises(QueueFull) as refused:
            dispatcher.submit(work(registry))
        assert refused.value.status == 429 and int(refused.value.headers()["Retry-After"]) >= 1

    asyncio.run(scenario())


def test_a_job_past_its_deadline_stops_its_image_on_the_replica(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(1, timeout=0.05)
        await until(lambda: serving(pool, "w0"))
        job = work(registry)
        with pytest.raises(JobTimeout):
            await dispatcher.run(job)
        await until(lambda: serve.cancels == [("w0", job.id)])
        await until(lambda: serving(pool, "w0"))  # ImageCanceled: the replica is idle again
        assert not serve.rendering()

    asyncio.run(scenario())


def test_shutdown_lets_the_image_in_flight_end_then_deletes_every_slot(registry):
    async def scenario():
        serve, pool, dispatcher = cluster(2)
        await until(lambda: serving(pool, "w0", "w1"))
        job = dispatcher.submit(work(registry))
        await until(lambda: serve.rendering())
        drained = asyncio.ensure_future(dispatcher.drain(5.0))
        await asyncio.sleep(0.05)
        assert not drained.done() and serve.deleted == []
        serve.finish(next(iter(serve.rendering())))
        assert await drained == 0 and job.state is WorkState.SUCCEEDED
        await dispatcher.close()
        assert sorted(serve.deleted) == ["w0", "w1"]
        assert {w.state for w in pool.handles()} == {WorkerState.STOPPED}

    asyncio.run(scenario())


def test_replicas_are_planned_from_the_workers_setting_and_the_cluster_gpus():
    assert plan_replicas("cpu:2", cluster_gpus=8) == ["cpu", "cpu"]
    assert plan_replicas("auto", cluster_gpus=3) == ["cuda"] * 3
    assert plan_replicas("auto", cluster_gpus=0) == ["cpu"]
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_replicas("cuda", cluster_gpus=0)


def test_a_node_whose_driver_drifts_has_its_replicas_quarantined_while_a_healthy_node_serves(registry, tmp_path):
    async def scenario():
        serve = FakeServe()
        pool = RayPool(configs(2), serve, probe_s=0.02, retry_s=0.01).launch()
        dispatcher = Dispatcher(pool=pool, max_queue=4, job_timeout_s=10.0)
        monitor = ConsistencyMonitor(
            suite=load_suite(), store=BaselineStore(tmp_path / "baselines.json"), registry=registry,
            metrics=Metrics(), interval_s=0, quarantine_on_drift=True, require_consistency=True,
        )
        monitor.attach(dispatcher)
        serve.up("w0", node="10.0.0.1")
        dispatcher.start()
        await answer_until(serve, lambda: monitor.worker("w0").state == "baseline_recorded")
        serve.up("w1", node="10.0.0.2").salt = "the node's new driver"  # same GPU model: same key group
        await answer_until(serve, lambda: monitor.worker("w1").state == "drifted")
        assert pool.workers["w1"].group_key == pool.workers["w0"].group_key
        assert pool.workers["w1"].state is WorkerState.QUARANTINED
        job = dispatcher.submit(work(registry, images=2))
        await answer_until(serve, lambda: job.finished)
        assert {r.image.worker_id for r in job.results.values()} == {"10.0.0.1/w0#r1"}  # only the healthy node

    asyncio.run(scenario())
