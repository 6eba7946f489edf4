"""Truthful readiness: a worker serves users only after its start-up golden check; storage failures show in /readyz."""

import asyncio
import shutil

from fastapi.testclient import TestClient

from app.provenance.golden import BaselineStore, load_suite
from app.services.consistency import ConsistencyMonitor
from app.settings import Settings
from app.telemetry.metrics import Metrics
from app.worker.pool import WorkerState
from tests.support.fakes import answering_app
from tests.unit.test_dispatcher import MODELS, answer_golden, make, renders, req, until


def holding_monitor(registry, tmp_path, require=True):
    return ConsistencyMonitor(
        suite=load_suite(), store=BaselineStore(tmp_path / "baselines.json"), registry=registry, metrics=Metrics(),
        interval_s=0, quarantine_on_drift=True, require_consistency=require,
    )


def user_renders(pool):
    return [m for m in renders(pool) if m.job_id.startswith("gen_")]


def test_a_started_worker_takes_user_work_only_after_its_check_passes(registry, tmp_path):
    async def scenario():
        monitor = holding_monitor(registry, tmp_path)
        harness, pool = make(registry, consistency=monitor)
        pool.ready("w0", models=MODELS)
        assert pool.workers["w0"].held and pool.workers["w0"].state is WorkerState.BUSY  # with a golden image
        assert not harness.ready() and monitor.checking() == ["w0"]
        job = asyncio.create_task(harness.generate(req(seed=1)))  # admitted: it waits, not refused
        await until(lambda: harness.waiting_jobs() == 1)
        assert await answer_golden(pool, "w0") == sum(c.cobatch for c in load_suite().for_family("sd1"))
        assert monitor.worker("w0").state == "baseline_recorded"
        assert pool.workers["w0"].state in (WorkerState.READY, WorkerState.BUSY)
        assert harness.ready() and monitor.checking() == []
        await until(lambda: len(user_renders(pool)) == 1)  # the user image went out only after the verdict
        assert all(m.job_id.startswith("golden_") for m in renders(pool)[: -1])
        pool.answer("w0", user_renders(pool)[0])
        assert (await job).images[0].image.worker_id == "w0"

    asyncio.run(scenario())


def test_a_worker_that_drifts_on_its_start_check_stays_out_until_a_rerun_passes(registry, tmp_path):
    async def scenario():
        monitor = holding_monitor(registry, tmp_path)
        harness, pool = make(registry, workers=2, consistency=monitor)
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        pool.ready("w1", models=MODELS)
        await answer_golden(pool, "w1", salt="other driver")
        assert monitor.worker("w1").state == "drifted"
        assert pool.workers["w1"].state is WorkerState.QUARANTINED and monitor.checking() == ["w1"]
        assert harness.ready()  # w0 serves
        monitor.start_check(pool.workers["w1"])
        await answer_golden(pool, "w1")
        assert monitor.worker("w1").state == "consistent" and pool.workers["w1"].state is WorkerState.READY

    asyncio.run(scenario())


def test_a_restarted_worker_is_checked_again_before_user_work(registry, tmp_path):
    async def scenario():
        monitor = holding_monitor(registry, tmp_path)
        harness, pool = make(registry, consistency=monitor)
        pool.ready("w0", models=MODELS)
        await answer_golden(pool, "w0")
        assert pool.workers["w0"].state is WorkerState.READY
        pool.die("w0")
        pool.ready("w0", models=MODELS)
        assert pool.workers["w0"].held and not harness.ready()
        await answer_golden(pool, "w0")
        assert monitor.worker("w0").state == "consistent" and harness.ready()

    asyncio.run(scenario())


def test_without_the_requirement_a_worker_serves_while_its_check_runs(registry, tmp_path):
    async def scenario():
        monitor = holding_monitor(registry, tmp_path, require=False)
        harness, pool = make(registry, consistency=monitor)
        pool.ready("w0", models=MODELS)
        assert pool.workers["w0"].state is not WorkerState.CHECKING and harness.ready()
        assert monitor.checking() == []

    asyncio.run(scenario())


def wait_ready(client, status, deadline_s=10.0):
    import time

    end = time.monotonic() + deadline_s
    while True:
        response = client.get("/readyz")
        if response.status_code == status or time.monotonic() > end:
            return response
        time.sleep(0.05)


def test_readyz_turns_503_naming_storage_while_writes_fail_and_recovers_by_itself(tmp_path):
    application = answering_app(Settings(data_dir=tmp_path, workers="cpu:1"))
    with TestClient(application, raise_server_exceptions=False) as client:
        ready = wait_ready(client, 200)
        assert ready.status_code == 200 and ready.json()["storage"] == {"ok": True, "error": None, "ledger": "sqlite"}
        images = tmp_path / "images"
        shutil.move(images, tmp_path / "images.away")
        images.write_bytes(b"")  # the image store cannot be written: every write below it fails
        failed = client.post("/v1/generations", json={"prompt": "a", "seed": 1})
        assert failed.status_code == 503 and failed.json()["error"]["type"] == "storage_unavailable"
        response = client.get("/readyz")  # at once: the failed write is remembered
        assert response.status_code == 503
        assert response.json()["ready"] is False and response.json()["storage"]["ok"] is False
        assert "images" in response.json()["storage"]["error"]
        images.unlink()
        shutil.move(tmp_path / "images.away", images)
        recovered = wait_ready(client, 200)
        assert recovered.status_code == 200 and recovered.json()["storage"]["ok"] is True
        assert client.post("/v1/generations", json={"prompt": "a", "seed": 1}).status_code == 200


def test_an_out_of_memory_image_is_answered_503_and_not_retried_anywhere(registry):
    # Same size, same memory: a retry on the same worker would fail again, so out_of_memory is final.
    from app.errors import OutOfMemory

    async def scenario():
        harness, pool = make(registry, workers=2)
        pool.ready("w0")
        pool.ready("w1")
        task = asyncio.create_task(harness.generate(req(seed=5, num_images=2)))
        await until(lambda: len(renders(pool)) == 2)
        pool.fail("w0", next(m for w, m in pool.sent if w == "w0"), error_type="out_of_memory")
        try:
            await task
        except OutOfMemory as exc:
            assert exc.status == 503
        else:
            raise AssertionError("out_of_memory expected")
        assert len(renders(pool)) == 2  # nothing re-sent, to w0 or w1
        assert pool.workers["w0"].state is WorkerState.READY  # the worker keeps serving

    asyncio.run(scenario())
