"""devicecheck's pure parts with fakes: device choice, nvidia-smi and /proc parsing, key fields, budget, report."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from app.devicecheck import probe, wheels
from app.devicecheck.report import Check, Measure, Report
from app.devicecheck.runner import PROFILES, Budget, Options, Run, profile_defaults

# ---------------------------------------------------------------- device choice and machine readings


def test_auto_picks_the_first_visible_gpu_else_the_cpu():
    assert probe.pick_device("auto", gpus=lambda: ["3", "5"]) == "cuda:3"
    assert probe.pick_device("auto", gpus=lambda: []) == "cpu"
    assert probe.pick_device("cpu", gpus=lambda: ["0"]) == "cpu"


def test_asking_for_cuda_without_a_gpu_fails_fast():
    with pytest.raises(RuntimeError, match="no NVIDIA GPU"):
        probe.pick_device("cuda", gpus=lambda: [])


def fake_smi(stdout: str):
    def run(command, **kwargs):
        assert command[0] == "nvidia-smi" and "--query-compute-apps=pid,used_memory" in command
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    return run


def test_gpu_memory_per_process_is_read_from_nvidia_smi():
    table = "4242, 3120\n4243, 2988\n4242, 10\n777, [N/A]\n"
    assert probe.gpu_memory_by_pid(run=fake_smi(table)) == {4242: 3130.0, 4243: 2988.0}


def test_gpu_memory_is_unknown_without_nvidia_smi():
    def missing(command, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert probe.gpu_memory_by_pid(run=missing) == {}


def test_peak_rss_comes_from_vmhwm(tmp_path):
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "status").write_text("Name:\tpython\nVmPeak:\t 999 kB\nVmHWM:\t  524288 kB\nVmRSS:\t 1 kB\n")
    assert probe.peak_rss_mib(12, proc=tmp_path) == 512.0
    assert probe.peak_rss_mib(13, proc=tmp_path) is None


# ---------------------------------------------------------------- key fields

H100 = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "compute_capability": "9.0",
        "cuda": "13.0", "cpu_capability": "AVX512"}


def cuda_runtime(**changes):
    runtime = {
        "device_kind": "cuda", "device_name": "NVIDIA H100 80GB HBM3 (132 SMs)", "cpu_capability": "AVX512",
        "cuda_capability": "9.0", "torch_threads": 16, "deterministic_algorithms": True,
        "cudnn_deterministic": True, "cudnn_benchmark": False, "tf32_matmul": False, "tf32_cudnn": False,
        "cublas_workspace_config": ":4096:8", "attention_backend": "sdpa-math", "noise_device": "cpu",
        "reproducibility_key": "rk1-" + "0" * 64, "key_fields": ["device_kind"],
        "versions": {"torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": "91200"},
    }
    runtime.update(changes)
    return runtime


def test_a_complete_cuda_runtime_has_no_problems():
    assert probe.key_field_problems(cuda_runtime(), "cuda", 1, expected=H100) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"device_name": "NVIDIA H100 80GB HBM3"}, "device_name"),  # no SM count
        ({"cuda_capability": None}, "cuda_capability"),
        ({"tf32_matmul": True}, "tf32_matmul"),
        ({"cudnn_benchmark": True}, "cudnn_benchmark"),
        ({"cublas_workspace_config": None}, "cublas_workspace_config"),
        ({"attention_backend": "sdpa-flash"}, "attention_backend"),
        ({"versions": {"torch": "2.11.0", "cuda": "13.0", "cudnn": None}}, "versions.cudnn"),
        ({"device_name": "NVIDIA H200 (132 SMs)"}, "device_name"),  # another GPU than this process sees
        ({"cuda_capability": "8.0"}, "cuda_capability"),
    ],
)
def test_each_missing_or_wrong_cuda_field_is_named(changes, field):
    problems = probe.key_field_problems(cuda_runtime(**changes), "cuda", 1, expected=H100)
    assert any(p.startswith(field + "=") for p in problems), problems


def test_cpu_runtime_checks_threads_and_instruction_set():
    runtime = cuda_runtime(device_kind="cpu", device_name="AMD EPYC", cuda_capability=None, torch_threads=1,
                           attention_backend="sdpa-cpu", versions={"torch": "2.13.0", "cuda": None, "cudnn": None})
    assert probe.key_field_problems(runtime, "cpu", 1, expected={"kind": "cpu", "cpu_capability": "AVX512"}) == []
    problems = probe.key_field_problems(runtime, "cpu", 2, expected={"kind": "cpu", "cpu_capability": "AVX2"})
    assert sorted(p.split("=")[0] for p in problems) == ["cpu_capability", "torch_threads"]


# ---------------------------------------------------------------- profiles, budget, phases, report


def options(tmp_path: Path, **changes) -> Options:
    values = {**PROFILES["cpu"], "device": "cpu", "threads": 1, "budget_s": 100.0, "work": tmp_path / "work",
              "out": tmp_path / "report.json", **changes}
    return Options(**values)


def test_profiles_default_what_the_command_line_leaves_out():
    assert profile_defaults("cuda", {"size": None, "steps": 30}) == {**PROFILES["cuda"], "steps": 30}
    assert PROFILES["cuda"]["variant"] == "full" and PROFILES["cuda"]["dtype"] == "float16"
    assert (PROFILES["cuda"]["size"], PROFILES["cuda"]["steps"]) == (512, 50)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_the_budget_cannot_pay_for_is_skipped_and_the_report_says_so(tmp_path):
    clock = FakeClock()
    run = Run(options(tmp_path), Budget(10.0, clock=clock))
    ran = []
    run.seconds_per_image = 1.0
    run.phase("cheap", 5, ("a",), lambda: ran.append("cheap"))
    clock.now = 8.0
    run.phase("dear", 5, ("b", "c"), lambda: ran.append("dear"))
    assert ran == ["cheap"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["budget_exhausted"] is True
    assert [line.split(":")[0] for line in report["lines"]] == ["SKIP  b", "SKIP  c"]
    assert "budget: 2s left" in report["lines"][0]


def test_a_phase_that_raises_errors_its_unrecorded_checks_and_later_phases_still_run(tmp_path):
    run = Run(options(tmp_path, skip=("restart",)))

    def breaks() -> None:
        run.report.add_check(Check("first", "pass", "recorded before the failure"))
        raise ValueError("boom")

    run.phase("broken", 0, ("first", "second"), breaks)
    run.phase("restart", 0, ("worker_restart",), lambda: pytest.fail("skipped phases do not run"))
    run.phase("needs", 0, ("needs_server",), lambda: pytest.fail("no server"), needs_server=True)
    run.phase("fine", 0, ("third",), lambda: run.report.add_check(Check("third", "pass", "ok")))
    outcomes = {c.name: (c.outcome, c.detail) for c in run.report.checks}
    assert outcomes["first"][0] == "pass"
    assert outcomes["second"] == ("error", "phase broken raised ValueError: boom")
    assert outcomes["worker_restart"] == ("skipped", "--skip restart")
    assert outcomes["needs_server"] == ("skipped", "the server did not start")
    assert outcomes["third"][0] == "pass"
    assert not run.report.passed


def test_report_passes_only_without_failures_and_writes_lines_and_table(tmp_path):
    report = Report(params={}, device={"name": "NVIDIA H100", "kind": "cuda"}, model={"variant": "full"})
    assert not report.passed  # nothing checked is not a pass
    report.add_check(Check("repeat", "pass", "bitwise equal"))
    report.add_check(Check("latency", "skipped", "budget"))
    report.add_measure(Measure("service / plain diffusers", 1.02, "x", "<= 1.05", True))
    assert report.passed
    report.write(tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["format"] == "sameseed.devicecheck/1" and written["passed"] is True
    assert written["lines"] == ["PASS  repeat: bitwise equal", "SKIP  latency: budget"]
    assert "goal <= 1.05: met" in report.table() and report.table().endswith("overall: PASS")
    report.add_check(Check("repeat", "fail", "DIFFERENT"))  # replaces the earlier one
    assert not report.passed and report.lines()[-1] == "FAIL  repeat: DIFFERENT"


# ---------------------------------------------------------------- device wheels


def test_the_wheel_plan_leaves_out_torch_cuda_and_what_the_machine_has(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# comment\ndiffusers==0.42.1 \\\n    --hash=sha256:00\ntorch==2.13.0\nnvidia-cublas==13.1\n"
        "numpy==2.4.6\ntransformers==5.23.0\nPyYAML==6.0.3\nruamel.yaml==0.19.1\n"
    )
    pins = wheels.lock_pins(lock)
    assert pins["ruamel-yaml"] == "ruamel.yaml==0.19.1" and pins["pyyaml"] == "PyYAML==6.0.3"
    # numpy and PyYAML are on the machine; transformers is carried at the lock's version anyway
    assert wheels.plan(pins) == ["diffusers==0.42.1", "ruamel.yaml==0.19.1", "transformers==5.23.0"]


def fake_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        meta = "Metadata-Version: 2.1\nName: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        archive.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_unmet_requirements_of_carried_wheels_are_reported(tmp_path):
    carried = [
        fake_wheel(tmp_path, "diffusers", ["numpy", "safetensors>=0.3", "regress", 'pytest; extra == "test"',
                                           'tomli; python_version < "3.11"', 'pywin32; sys_platform == "win32"']),
        fake_wheel(tmp_path, "pydantic_core", ["typing-extensions>=4.14"]),
    ]
    assert wheels.unmet(carried) == ["diffusers-1.0-py3-none-any.whl needs regress"]


# ---------------------------------------------------------------- CUDA branches, with fakes


class FakeResponse:
    def __init__(self, body):
        self.body = body

    def json(self):
        return self.body


class FakeServer:
    """Answers /readyz like a one-GPU server."""

    def __init__(self, pids):
        self.client = self
        self.pids = pids

    def get(self, path, **kwargs):
        assert path == "/readyz"
        return FakeResponse({"workers": [{"id": f"w{i}", "pid": pid} for i, pid in enumerate(self.pids)]})


def test_gpu_memory_and_peak_rss_are_recorded_per_worker_on_cuda(tmp_path, monkeypatch):
    run = Run(options(tmp_path, device="cuda:0"))
    run.server = FakeServer([101, 102])
    monkeypatch.setattr(probe, "gpu_memory_by_pid", lambda: {101: 2900.0, 102: 3100.0, 555: 70000.0})
    monkeypatch.setattr(probe, "peak_rss_mib", lambda pid: {101: 900.0, 102: 950.0}[pid])
    run.record_worker_memory("server worker")
    measures = {m.name: m.value for m in run.report.measures}
    assert measures == {"GPU memory per server worker": 3100.0, "peak RSS per server worker": 950.0}


def test_cpu_runs_record_no_gpu_memory(tmp_path, monkeypatch):
    run = Run(options(tmp_path))
    run.server = FakeServer([101])
    monkeypatch.setattr(probe, "gpu_memory_by_pid", lambda: pytest.fail("nvidia-smi is not asked on CPU"))
    monkeypatch.setattr(probe, "peak_rss_mib", lambda pid: 400.0)
    run.record_worker_memory("server worker")
    assert [m.name for m in run.report.measures] == ["peak RSS per server worker"]


def test_a_rerun_with_the_same_work_folder_reuses_the_model_and_pins_its_files(tmp_path, monkeypatch):
    import yaml

    from app.models import fullsize

    builds = []

    def fake_build(config_dir, out_dir, *, seed, dtype, overrides):
        builds.append(dtype)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model_index.json").write_text("{}")
        (out_dir / "weights.safetensors").write_bytes(dtype.encode())
        return out_dir

    monkeypatch.setattr(fullsize, "build_from_configs", fake_build)
    monkeypatch.setattr(fullsize, "parameter_counts", lambda *a: {"unet": 1})
    Run(options(tmp_path)).build_model()
    second = Run(options(tmp_path))
    second.build_model()
    assert builds == ["float32"] and second.report.checks[0].detail.endswith("reused from --work")
    Run(options(tmp_path, dtype="float16")).build_model()  # another recipe: built again
    assert builds == ["float32", "float16"]
    pins = yaml.safe_load((tmp_path / "work" / "registry.yaml").read_text())["models"][0]["sha256"]
    assert pins["weights.safetensors"] == hashlib.sha256(b"float16").hexdigest()
