"""What operators scrape and read: process and build metrics, zeroed counters, OpenMetrics, HTTP timing, logs."""

import json
import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import app
from app.settings import Settings
from app.telemetry.logs import JsonFormatter
from tests.support.fakes import answering_app


@pytest.fixture()
def client(tmp_path):
    application = answering_app(Settings(data_dir=tmp_path, workers="cpu:2"))
    with TestClient(application, raise_server_exceptions=False) as test_client:
        yield test_client


def samples(text):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_carry_process_python_and_build_series_and_no_created(client):
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name in ("process_resident_memory_bytes", "process_open_fds", "python_info", "python_gc_collections_total"):
        assert f"\n{name}" in text, name
    found = samples(text)
    build = [labels for (name, labels) in found if name == "sameseed_build_info"]
    assert len(build) == 1 and ("version", app.__version__) in build[0]
    assert "_created" not in text


def test_counters_exist_at_zero_before_their_first_event(client):
    found = samples(client.get("/metrics").text)
    for worker in ("w0", "w1"):
        assert found[("sameseed_worker_restarts_total", (("worker", worker),))] == 0
        assert found[("sameseed_consistency_mismatches_total", (("worker", worker),))] == 0
    assert found[("sameseed_vae_upcasts_total", (("model", "sameseed-tiny"),))] == 0
    assert found[("sameseed_jobs_total", (("outcome", "out_of_memory"),))] == 0
    assert found[("sameseed_image_retries_total", ())] == 0


def test_openmetrics_is_served_when_the_scraper_asks_for_it(client):
    response = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n") and "_created" not in response.text


def test_http_requests_are_timed_by_route_template_and_status(client):
    client.get("/v1/models")
    client.get("/v1/generations/gen_00000000")  # 404 from the ledger
    client.get("/no/such/path/1")
    client.get("/no/such/path/2")
    found = samples(client.get("/metrics").text)

    def count(route, status):
        key = (
            "sameseed_http_request_duration_seconds_count",
            (("method", "GET"), ("route", route), ("status", status)),
        )
        return found.get(key)

    assert count("/v1/models", "200") == 1
    assert count("/v1/generations/{generation_id}", "404") == 1
    assert count("unmatched", "404") == 2  # probes of unknown paths share one series


def test_json_logs_drop_uvicorns_ansi_color_message():
    record = logging.makeLogRecord(
        {"msg": "Uvicorn running on %s", "args": ("http://127.0.0.1:8000",), "levelname": "INFO",
         "color_message": "Uvicorn running on \x1b[1m%s\x1b[0m", "generation_id": "gen_1"}
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Uvicorn running on http://127.0.0.1:8000"
    assert "color_message" not in entry and entry["generation_id"] == "gen_1"
