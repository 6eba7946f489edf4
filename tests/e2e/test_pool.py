"""Worker pool end to end: real worker processes, concurrency, a killed worker, metrics (faults: test_pool_faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import ROOT, Server

SLOW = {"seed": 31, "steps": 30, "width": 128, "height": 128}  # ~1.5 s on the tiny model here (~5 s under load)
MIXED = [
    {"seed": 1, "sampler": "euler"},
    {"seed": 2, "sampler": "euler_a", "num_images": 2},
    {"seed": 3, "sampler": "ddim", "guidance_scale": 0.0},
    {"seed": 4, "sampler": "dpmpp_2m", "negative_prompt": "blurry"},
    {"seed": 5, "sampler": "pndm", "width": 96, "height": 64},
    {"seed": 6, "sampler": "lms", "num_images": 3},
]


def hashes(body):
    return [(i["seed"], i["latent_sha256"], i["pixel_sha256"]) for i in body["images"]]


def wait_for(predicate, deadline_s=60.0, what="condition"):
    """Poll until predicate() is truthy; returns its value."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {deadline_s}s")


def busy_worker(srv):
    workers = srv.client.get("/readyz").json()["workers"]
    return next((w for w in workers if w["state"] == "busy"), None)


def in_background(fn, *args, **kwargs):
    result = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except Exception as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("two"), SAMESEED_WORKERS="cpu:2").start()
    yield srv
    srv.stop()


def test_two_workers_give_the_same_bits_as_one_on_concurrent_mixed_requests(server, two_workers):
    with ThreadPoolExecutor(max_workers=len(MIXED)) as pool:
        on_two = list(pool.map(lambda body: two_workers.generate(**body), MIXED))
    on_one = [server.generate(**body) for body in MIXED]
    assert [hashes(b) for b in on_two] == [hashes(b) for b in on_one]
    keys = {b["manifest"]["runtime"]["reproducibility_key"] for b in on_one + on_two}
    assert len(keys) == 1
    used = {image["worker_id"] for body in on_two for image in body["manifest"]["images"]}
    assert used == {"w0", "w1"}


def test_an_n_image_request_spread_over_two_workers_equals_one_worker(server, two_workers):
    body = {"seed": 900, "num_images": 4, "sampler": "euler_a", "steps": 30}
    spread = two_workers.generate(**body)
    assert {i["worker_id"] for i in spread["manifest"]["images"]} == {"w0", "w1"}
    assert hashes(spread) == hashes(server.generate(**body))


def test_readyz_lists_each_worker_with_pid_state_and_key(two_workers):
    ready = two_workers.client.get("/readyz").json()
    assert ready["ready"] is True and ready["draining"] is False
    assert [w["id"] for w in ready["workers"]] == ["w0", "w1"]
    for worker in ready["workers"]:
        assert worker["pid"] and worker["state"] in ("ready", "busy") and worker["torch_threads"] == 1
        assert worker["models"]["sameseed-tiny"].startswith("rk1-")
    assert len({w["group_key"] for w in ready["workers"]}) == 1


def test_a_request_naming_a_key_runs_in_its_group_or_gets_409(two_workers):
    key = two_workers.client.get("/readyz").json()["workers"][0]["models"]["sameseed-tiny"]
    body = two_workers.generate(seed=8, reproducibility_key=key)
    assert body["manifest"]["runtime"]["reproducibility_key"] == key
    response = two_workers.post(seed=8, reproducibility_key="rk1-" + "0" * 64)
    assert response.status_code == 409
    assert response.json()["error"]["param"] == "reproducibility_key" and key in response.json()["error"]["message"]


def test_sigkill_of_a_worker_mid_job_is_retried_identically_and_the_worker_comes_back(server, two_workers):
    expected = hashes(server.generate(**SLOW))
    thread, result = in_background(two_workers.post, **SLOW)
    victim = wait_for(lambda: busy_worker(two_workers), what="a busy worker")
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    response = result["value"]
    if response.status_code == 200:  # retried on a live worker: bitwise the same
        assert hashes(response.json()) == expected
    else:
        assert response.status_code == 503 and response.json()["error"]["type"] == "worker_lost"

    def back():
        workers = {w["id"]: w for w in two_workers.client.get("/readyz").json()["workers"]}
        worker = workers[victim["id"]]
        return worker["state"] == "ready" and worker["restarts"] == 1 and worker["pid"] != victim["pid"]

    wait_for(back, what="the killed worker restarted")
    metrics = two_workers.client.get("/metrics").text
    assert f'sameseed_worker_restarts_total{{worker="{victim["id"]}"}} 1.0' in metrics
    assert hashes(two_workers.generate(**SLOW)) == expected


def test_metrics_export_queue_jobs_latency_and_worker_series(server):
    server.generate(seed=11)
    text = server.client.get("/metrics").text
    for series in (
        "sameseed_queue_depth 0.0",
        'sameseed_jobs_total{outcome="ok"}',
        "sameseed_queue_wait_seconds_bucket",
        "sameseed_generation_seconds_count",
        "sameseed_request_seconds_sum",
        'sameseed_worker_state{state="ready",worker="w0"} 1.0',
        'sameseed_worker_busy_seconds_total{worker="w0"}',
    ):
        assert series in text, series


def test_workers_cuda_without_a_gpu_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "SAMESEED_WORKERS": "cuda", "SAMESEED_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no NVIDIA GPU" in done.stderr


def test_invalid_settings_fail_fast_naming_the_variable(tmp_path):
    env = {**os.environ, "SAMESEED_WORKERS": "gpu:2", "SAMESEED_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "SAMESEED_WORKERS" in done.stderr


def test_http_timeout_is_not_needed_for_health_while_busy(two_workers):
    thread, _ = in_background(two_workers.post, **SLOW)
    wait_for(lambda: busy_worker(two_workers), what="a busy worker")
    started = time.monotonic()
    assert httpx.get(two_workers.url + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 2
    thread.join(timeout=120)
