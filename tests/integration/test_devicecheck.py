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


def test_turning_determinism_off_and_on_again_flips_every_setting_on_cuda():
    import torch

    from app.devicecheck.direct import DirectPipeline

    direct = DirectPipeline.__new__(DirectPipeline)  # the settings only: no model, no GPU
    direct.device = "cuda"
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    try:
        direct.determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert "flash and memory-efficient SDPA on" in direct.loose_settings
        direct.determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.flash_sdp_enabled() and direct.loose_settings == ""
    finally:  # this test process's settings as they were
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:5]
        torch.backends.cuda.enable_flash_sdp(saved[5])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[6])
