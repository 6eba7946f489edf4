"""`python -m app devicecheck` end to end on the CPU (the dry run of the GPU check), tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.cli.server_process import ROOT

CHECKS = ["model_built", "repeat", "key_fields", "n_image_vs_singles", "concurrency", "golden_suite",
          "fp16_vae_guard", "two_workers", "worker_restart", "latency_measured"]


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_check_and_reports_what_it_ran(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "app", "devicecheck", "--device", "cpu", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["format"] == "sameseed.devicecheck/1" and report["passed"] is True
    assert [line.split(":")[0] for line in report["lines"]] == [f"PASS  {name}" for name in CHECKS]
    assert report["device"]["kind"] == "cpu"
    assert report["model"]["variant"] == "tiny" and report["model"]["dtype"] == "float32"
    assert report["params"]["size"] == 64 and report["params"]["device"] == "cpu"
    measures = {m["name"]: m for m in report["measures"]}
    assert measures["service / plain diffusers"]["goal"] == "<= 1.05"
    assert measures["time to ready (server start to /readyz 200)"]["value"] > 0
    assert measures["peak RSS per pool worker"]["value"] > 0
    evidence = {c["name"]: c["evidence"] for c in report["checks"]}
    assert len({w["worker"] for w in evidence["two_workers"]["workers"]}) == 2
    assert evidence["worker_restart"]["old_pid"] != evidence["worker_restart"]["new_pid"]
    assert "overall: PASS" in done.stdout and "PASS  repeat" in done.stdout


def test_unknown_phases_to_skip_are_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app", "devicecheck", "--device", "cpu", "--skip", "warp", "--out",
         str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "not warp" in done.stderr
    assert not (tmp_path / "r.json").exists()
