"""The series deploy/monitoring's alert rules and dashboard read, as /metrics exports them (fake pool)."""

import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from tests.support.fakes import FAKE_KEY, FakePool


def samples(text):
    """{(name, frozenset(labels)): value} of a Prometheus text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


class LoadedPool(FakePool):
    """A fake pool whose workers answer at once and report the tiny model loaded (so golden checks run)."""

    def ready(self, worker_id, group_key="g1", models=None):
        super().ready(worker_id, group_key, models or {"sameseed-tiny": {"reproducibility_key": FAKE_KEY}})


@pytest.fixture()
def client(tmp_path):
    settings = Settings(data_dir=tmp_path, workers="cpu:1", max_queue=7, consistency_interval_s=120)
    application = create_app(settings, pool_factory=lambda configs: LoadedPool(configs, auto=True))
    with TestClient(application) as test_client:
        yield test_client


def test_metrics_export_what_the_alert_rules_need(client):
    before = time.time()
    checked = client.post("/v1/consistency/run")
    assert checked.status_code == 200 and checked.json()["workers"][0]["state"] != "unchecked"
    assert client.post("/v1/generations", json={"prompt": "a cat", "seed": 1}).status_code == 200
    assert client.post("/v1/generations", json={"prompt": "a cat", "model": "nope"}).status_code == 404
    values = samples(client.get("/metrics").text)

    def value(name, **labels):
        return values.get((name, frozenset(labels.items())))

    assert value("sameseed_queue_limit") == 7
    assert value("sameseed_consistency_interval_seconds") == 120
    assert before <= value("sameseed_consistency_last_check_timestamp_seconds", worker="w0") <= time.time()
    # error answers by type; the alerted ones exist at 0 before the first one, so increase() sees it
    assert value("sameseed_errors_total", type="model_not_found") == 1
    assert value("sameseed_errors_total", type="queue_full") == 0
    assert value("sameseed_errors_total", type="storage_unavailable") == 0
    assert value("sameseed_generation_seconds_count", model="sameseed-tiny") == 1  # golden images not counted
    assert value("sameseed_vae_upcasts_total", model="sameseed-tiny") == 0
    assert value("sameseed_worker_restarts_total", worker="w0") == 0


def test_metrics_name_each_workers_reproducibility_key(tmp_path):
    key = "k" * 64
    settings = Settings(data_dir=tmp_path, workers="cpu:2")

    class OneLoaded(FakePool):
        def start(self):  # w0 loads the tiny model, w1 is still starting
            super().start()
            self.ready("w0", models={"sameseed-tiny": {"reproducibility_key": key}})

    def pool(configs):
        return OneLoaded(configs)

    with TestClient(create_app(settings, pool_factory=pool)) as client:
        values = samples(client.get("/metrics").text)
    info = {labels: v for (name, labels), v in values.items() if name == "sameseed_worker_key_info"}
    assert info == {frozenset({"worker": "w0", "model": "sameseed-tiny", "reproducibility_key": key}.items()): 1}
