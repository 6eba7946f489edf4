"""Faults on one real worker: a model that fails to load answers its error, a full queue answers 429, SIGTERM drains.

One server serves the module (a queue of one, a registry with a broken model); its last test drains it.
"""

from __future__ import annotations

import shutil
import signal

import pytest

from tests.e2e.conftest import ROOT, Server
from tests.e2e.test_pool import SLOW, busy_worker, in_background, wait_for


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One worker, a queue of one, and a registry with a model that fails to load: the fault tests' server.

    The module's last test drains it with SIGTERM.
    """
    root = tmp_path_factory.mktemp("single")
    tiny = ROOT / "app" / "models" / "sameseed-tiny"
    broken = root / "broken"
    shutil.copytree(tiny, broken)
    config = broken / "vae" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": "oops"'))
    registry = root / "registry.yaml"
    defaults = "{width: 64, height: 64, steps: 4}"
    registry.write_text(
        "version: 1\ndefault_model: tiny\nmodels:\n"
        f"  - {{id: tiny, family: sd1, source: {{local: {tiny}}}, defaults: {defaults}}}\n"
        f"  - {{id: broken, family: sd1, source: {{local: {broken}}}, defaults: {defaults}}}\n"
    )
    srv = Server(root / "data", SAMESEED_MODELS=str(registry), SAMESEED_MAX_QUEUE="1").start()
    yield srv
    srv.stop()


def test_a_job_error_is_answered_and_the_worker_keeps_serving(single):
    failed = single.post(model="broken", seed=1)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "generation_failed"
    assert "TypeError" in failed.json()["error"]["message"]
    assert single.post(model="tiny", seed=1).status_code == 200
    worker = single.client.get("/readyz").json()["workers"][0]
    assert worker["restarts"] == 0 and worker["jobs_done"] == 1


def test_full_queue_answers_429_with_retry_after(single):
    srv = single
    running, running_result = in_background(srv.post, **SLOW)
    wait_for(lambda: busy_worker(srv), what="a busy worker")
    waiting, waiting_result = in_background(srv.post, seed=2)
    wait_for(lambda: srv.client.get("/readyz").json()["queue_depth"] == 1, what="one waiting job")
    refused = srv.post(seed=3)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "queue_full"
    running.join(timeout=120)
    waiting.join(timeout=120)
    assert running_result["value"].status_code == 200 and waiting_result["value"].status_code == 200
    assert 'sameseed_jobs_total{outcome="queue_full"} 1.0' in srv.client.get("/metrics").text


def test_sigterm_drains_the_job_in_flight_refuses_new_ones_and_exits_zero(single):
    srv = single  # the module's last test: the server exits
    thread, result = in_background(srv.post, **SLOW)
    wait_for(lambda: busy_worker(srv), what="a busy worker")
    srv.process.send_signal(signal.SIGTERM)
    wait_for(lambda: srv.client.get("/readyz").json()["draining"], deadline_s=10, what="draining")
    refused = srv.post(seed=1)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
    assert "draining" in refused.json()["error"]["message"]
    thread.join(timeout=120)
    assert result["value"].status_code == 200, result["value"].text
    assert srv.process.wait(timeout=60) == 0
