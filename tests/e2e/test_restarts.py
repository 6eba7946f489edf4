"""A server SIGKILLed with work in hand, then started again on its data dir with a new signing key.

One lifetime pair serves every restart promise (each pair of server starts costs the suite about
20 s of CPU): a 200 loses nothing, old images stay verifiable after the key rotation, accepted
async jobs are reported failed, golden baselines persist and the second start is consistent
against them, and the new process reproduces the old one's hashes. Last, a third start with two
torch threads and API keys replays the first one's generation from the ledger (other key,
differences, drift), and its keys guard everything but health.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from httpx_sse import connect_sse

from app.provenance.signing import private_key_pem
from tests.e2e.conftest import ROOT, Server

ASYNC = {"Prefer": "respond-async"}
KEY = "team-key-5d1c0f3e9a7b4c21"
AUTH = {"Authorization": f"Bearer {KEY}"}


def key_file(path: Path) -> Path:
    """A fresh Ed25519 signing key written as the server reads it (PEM, mode 600)."""
    path.write_bytes(private_key_pem(Ed25519PrivateKey.generate()))
    path.chmod(0o600)
    return path


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def checked(srv: Server, deadline_s: float = 60.0) -> dict[str, Any]:
    """Poll GET /v1/consistency until every worker finished its start-up check."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        report = srv.client.get("/v1/consistency").json()
        if all(w["state"] != "unchecked" for w in report["workers"]):
            return report
        time.sleep(0.05)
    raise AssertionError(f"start-up golden check did not finish: {report}")


@dataclass
class Lifetimes:
    """What the first server did before its SIGKILL, and the second server (running) on the same data dir."""

    first_report: dict[str, Any]  # its start-up golden check
    first_ready: dict[str, Any]  # its /readyz
    first_worker_pids: list[int]
    made: dict[str, Any]  # a 2-image generation answered 200 just before the kill
    accepted: list[httpx.Response]  # async jobs accepted (one running, one queued) when it was killed
    second: Server
    data_dir: Path


@pytest.fixture(scope="module")
def lifetimes(tmp_path_factory) -> Lifetimes:
    root = tmp_path_factory.mktemp("restarts")
    first = Server(root / "data", SAMESEED_SIGNING_KEY_FILE=str(key_file(root / "k1.pem"))).start()
    try:
        report, ready = checked(first), first.client.get("/readyz").json()
        made = first.generate(seed=31337, num_images=2)
        running_job = first.client.post("/v1/generations", json={"prompt": "a cat", "steps": 150}, headers=ASYNC)
        queued_job = first.client.post("/v1/generations", json={"prompt": "a dog", "steps": 150}, headers=ASYNC)
        assert (running_job.status_code, queued_job.status_code) == (202, 202)
        assert first.client.get(queued_job.headers["location"]).json()["state"] == "queued"
    finally:
        first.process.kill()  # no drain: whatever was answered or accepted must still be accounted for
        first.process.wait(timeout=10)
    second = Server(root / "data", SAMESEED_SIGNING_KEY_FILE=str(key_file(root / "k2.pem"))).start()
    yield Lifetimes(
        report, ready, [w["pid"] for w in ready["workers"]], made, [running_job, queued_job], second, root / "data"
    )
    second.stop()


def test_the_killed_servers_workers_exit_by_themselves(lifetimes):
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in lifetimes.first_worker_pids):  # they notice their parent is gone
        assert time.monotonic() < deadline, "orphan workers kept running"
        time.sleep(0.1)


def test_a_200_survives_sigkill_and_rotating_the_key_keeps_old_images_verifiable(lifetimes):
    second, made = lifetimes.second, lifetimes.made
    record = second.client.get(f"/v1/generations/{made['id']}")
    assert record.status_code == 200, record.text
    assert record.json()["manifest"] == made["manifest"] and record.json()["status"] == "stored"
    for image in made["images"]:
        stored = second.client.get(image["url"])
        assert stored.status_code == 200 and stored.content == base64.b64decode(image["png_base64"])

    new = second.generate(seed=7)
    keys = second.client.get("/v1/keys").json()["keys"]
    old_id, new_id = made["manifest"]["signature"]["key_id"], new["manifest"]["signature"]["key_id"]
    assert old_id != new_id
    assert [(k["key_id"], k["active"]) for k in keys] == [(new_id, True), (old_id, False)]
    for png, key_id in ((made["images"][0]["png_base64"], old_id), (new["images"][0]["png_base64"], new_id)):
        content = base64.b64decode(png)
        result = second.client.post("/v1/verify", content=content, headers={"content-type": "image/png"}).json()
        assert result["valid"] and result["known_to_ledger"] and result["key_id"] == key_id, result


def test_jobs_the_killed_server_had_accepted_are_reported_failed(lifetimes):
    second = lifetimes.second
    for accepted in lifetimes.accepted:
        status = second.client.get(accepted.headers["location"]).json()
        assert status["state"] == "failed" and status["error"]["type"] == "interrupted", status
        with connect_sse(second.client, "GET", accepted.headers["location"] + "/events") as source:
            assert [e.event for e in source.iter_sse()] == ["failed"]


def test_the_new_process_reproduces_the_old_ones_hashes(lifetimes):
    before = lifetimes.made
    after = lifetimes.second.generate(seed=31337, num_images=2)
    assert [(i["latent_sha256"], i["pixel_sha256"]) for i in before["images"]] == [
        (i["latent_sha256"], i["pixel_sha256"]) for i in after["images"]
    ]
    assert before["manifest"]["runtime"]["reproducibility_key"] == after["manifest"]["runtime"]["reproducibility_key"]


def test_baselines_persist_across_restarts_and_the_second_start_is_consistent(lifetimes):
    report, ready, second = lifetimes.first_report, lifetimes.first_ready, lifetimes.second
    assert report["status"] == "baseline_recorded"
    (worker,) = report["workers"]
    singles = [c for c in worker["cases"] if c["cobatched_with"] is None]
    assert len(singles) == 5 and all(c["state"] == "baseline_recorded" for c in singles)
    # the co-batched case ran in one call with a companion where the worker proved a batch of 2 at this shape
    # (else alone), and gave its single-run twin's recorded hashes either way
    (proof,) = [v for w in ready["workers"] for v in w["cobatch"]
                if (v["model"], v["width"], v["guided"], v["size"]) == ("sameseed-tiny", 64, True, 2)]
    (cobatched,) = [c for c in worker["cases"] if c["cobatched_with"] is not None]
    assert (cobatched["case"], cobatched["cobatched_with"]) == ("pndm-default-cobatched", 1 if proof["proven"] else 0)
    assert cobatched["state"] == "consistent"
    report = checked(second)
    assert report["status"] == "consistent"
    case = report["workers"][0]["cases"][0]
    assert case["expected_latent_sha256"] == case["actual_latent_sha256"]
    assert 'sameseed_consistency_state{state="consistent",worker="w0"} 1.0' in second.client.get("/metrics").text


def test_an_imported_baseline_with_one_wrong_hash_makes_the_worker_drifted(lifetimes, tmp_path):
    srv = lifetimes.second  # it leaves this server drifted: only the next test, which stops it, follows
    checked(srv)
    exported = tmp_path / "baselines.json"
    cli = [sys.executable, "-m", "app"]
    done = subprocess.run(
        [*cli, "baselines", "export", str(exported), "--server", srv.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(exported.read_text())
    document["baselines"][2]["pixel_sha256"] = "0" * 64
    exported.write_text(json.dumps(document))
    done = subprocess.run(
        [*cli, "baselines", "import", str(exported), "--server", srv.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0 and "imported 5" in done.stdout, done.stderr
    deadline = time.monotonic() + 60  # an import re-checks every worker: wait for that run's verdict
    while srv.client.get("/v1/consistency").json()["workers"][0]["state"] != "drifted":
        assert time.monotonic() < deadline, "the import's re-check did not find the wrong hash"
        time.sleep(0.05)

    out = tmp_path / "report.json"
    done = subprocess.run(
        [*cli, "golden", "run", "--server", srv.url, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and "status: drifted" in done.stdout, done.stdout + done.stderr
    report = json.loads(out.read_text())
    (worker,) = report["workers"]
    drifted = [c for c in worker["cases"] if c["state"] == "drifted"]
    assert len(drifted) == 1 and drifted[0]["expected_pixel_sha256"] == "0" * 64
    assert drifted[0]["actual_pixel_sha256"] != "0" * 64
    assert worker["worker_state"] == "ready"  # no consistent peer: it keeps serving, visibly drifted
    metrics = srv.client.get("/metrics").text
    # one mismatch counted by the import's re-check, one by the CLI's run
    assert 'sameseed_consistency_mismatches_total{worker="w0"} 2.0' in metrics


@pytest.fixture(scope="module")
def third(lifetimes, tmp_path_factory):
    """After the second server: a third on the same data dir with two torch threads and API keys turned on."""
    lifetimes.second.stop()
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"{KEY}\n")
    srv = Server(lifetimes.data_dir, SAMESEED_CPU_THREADS="2", SAMESEED_API_KEYS_FILE=str(keys)).start()
    yield srv
    srv.stop()


def test_a_generation_from_another_thread_count_is_replayed_with_differences_and_drift(lifetimes, third):
    verdict = third.client.post("/v1/reproduce", json={"generation_id": lifetimes.made["id"]}, headers=AUTH)
    assert verdict.status_code == 200, verdict.text
    verdict = verdict.json()
    assert verdict["same_key"] is False and verdict["source"] == "ledger"
    fields = {d["field"]: d for d in verdict["differences"]}
    assert fields["runtime.torch_threads"]["a"] == 1 and fields["runtime.torch_threads"]["b"] == 2
    assert fields["runtime.torch_threads"]["in_key"] is True
    assert any("no worker of this server has reproducibility key" in note for note in verdict["notes"])
    for image in verdict["images"]:
        latent, pixel = image["latent_drift"], image["pixel_drift"]
        assert latent is not None and pixel is not None  # the ledger kept the original latents and pixels
        assert (latent["max_abs"] == 0) == image["latent_match"]
        assert (pixel["max_abs"] == 0) == image["pixel_match"]


def test_api_keys_guard_everything_but_health(third):
    client = third.client  # /readyz answered without a key: the server started
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path

    denied = client.post("/v1/generations", json={"prompt": "a cat", "seed": 1})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "unauthorized"
    assert client.get("/v1/keys").status_code == 401

    body = client.post("/v1/generations", json={"prompt": "a cat", "seed": 1, "response_format": "url"}, headers=AUTH)
    assert body.status_code == 200, body.text
    url = body.json()["images"][0]["url"]
    assert client.get(url).status_code == 401
    assert client.get(url, headers=AUTH).status_code == 200
    third.stop()  # the module's last test
    assert KEY not in third.logs()
