"""Golden checks on real workers: baselines persist, imported wrong hashes drift, CLI reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, Server


def checked(srv, deadline_s=60.0):
    """Poll GET /v1/consistency until every worker finished its start-up check."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        report = srv.client.get("/v1/consistency").json()
        if all(w["state"] != "unchecked" for w in report["workers"]):
            return report
        time.sleep(0.05)
    raise AssertionError(f"start-up golden check did not finish: {report}")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A server that recorded its baselines (its report and /readyz), stopped, and a second start on the same
    data dir (running)."""
    data = tmp_path_factory.mktemp("consistency")
    first = Server(data).start()
    try:
        first_report, first_ready = checked(first), first.client.get("/readyz").json()
    finally:
        first.stop()
    second = Server(data).start()
    yield first_report, first_ready, second
    second.stop()


def test_baselines_persist_across_restarts_and_a_second_start_is_consistent(restarted):
    report, ready, second = restarted
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


def test_an_imported_baseline_with_one_wrong_hash_makes_the_worker_drifted(restarted, tmp_path):
    srv = restarted[2]  # runs after the test above has read its consistent state
    checked(srv)
    exported = tmp_path / "baselines.json"
    cli = [sys.executable, "-m", "app"]
    done = subprocess.run(
        [*cli, "baselines", "export", str(exported), "--server", srv.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(exported.read_text())
    document["baselines"][2]["pixel_sha256"] = "0" * 64
    exported.write_text(json.dumps(document))
    done = subprocess.run(
        [*cli, "baselines", "import", str(exported), "--server", srv.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "imported 5" in done.stdout, done.stderr

    out = tmp_path / "report.json"
    done = subprocess.run(
        [*cli, "golden", "run", "--server", srv.url, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "status: drifted" in done.stdout, done.stdout + done.stderr
    report = json.loads(out.read_text())
    (worker,) = report["workers"]
    drifted = [c for c in worker["cases"] if c["state"] == "drifted"]
    assert len(drifted) == 1 and drifted[0]["expected_pixel_sha256"] == "0" * 64
    assert drifted[0]["actual_pixel_sha256"] != "0" * 64
    assert worker["worker_state"] == "ready"  # no consistent peer: it keeps serving, visibly drifted
    metrics = srv.client.get("/metrics").text
    assert 'sameseed_consistency_mismatches_total{worker="w0"} 1.0' in metrics
