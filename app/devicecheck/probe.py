"""What devicecheck reads about the machine: which device, GPU memory and peak RSS per process, key fields."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.pipeline.determinism import CUBLAS_WORKSPACE_CONFIG
from app.worker.plan import visible_gpus

Runner = Callable[..., subprocess.CompletedProcess]


def pick_device(requested: str, gpus: Callable[[], list[str]] = visible_gpus) -> str:
    """`auto` gives `cuda:<first visible GPU>` when nvidia-smi shows one, else `cpu`; `cuda` without one raises."""
    if requested == "cpu":
        return "cpu"
    found = gpus()
    if requested == "cuda" and not found:
        raise RuntimeError("--device cuda, but nvidia-smi shows no NVIDIA GPU")
    return f"cuda:{found[0]}" if found else "cpu"


def gpu_memory_by_pid(run: Runner = subprocess.run) -> dict[int, float]:
    """MiB of GPU memory each process holds, from nvidia-smi; empty when it cannot tell."""
    try:
        out = run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[int, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                found[int(parts[0])] = found.get(int(parts[0]), 0.0) + float(parts[1])
            except ValueError:  # "[N/A]" under some drivers
                continue
    return found


def peak_rss_mib(pid: int, proc: Path = Path("/proc")) -> float | None:
    """A process's peak resident set (VmHWM) in MiB, or None when /proc does not say."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def key_field_problems(
    runtime: dict[str, Any], device_kind: str, threads: int, expected: dict[str, Any] | None = None
) -> list[str]:
    """What is missing or wrong in a manifest's runtime section for a worker on `device_kind`; [] when all is there.

    `expected` is this process's own view of the device (`device_info`): the worker must record the same GPU.
    """
    problems: list[str] = []

    def expect(field: str, ok: bool, wanted: str) -> None:
        if not ok:
            value = runtime
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            problems.append(f"{field}={value!r} (wanted {wanted})")

    versions = runtime.get("versions") or {}
    expect("device_kind", runtime.get("device_kind") == device_kind, device_kind)
    expect("deterministic_algorithms", runtime.get("deterministic_algorithms") is True, "True")
    expect("cudnn_deterministic", runtime.get("cudnn_deterministic") is True, "True")
    expect("cudnn_benchmark", runtime.get("cudnn_benchmark") is False, "False")
    expect("tf32_matmul", runtime.get("tf32_matmul") is False, "False")
    expect("tf32_cudnn", runtime.get("tf32_cudnn") is False, "False")
    expect("noise_device", runtime.get("noise_device") == "cpu", "'cpu'")
    expect("reproducibility_key", str(runtime.get("reproducibility_key", "")).startswith("rk1-"), "rk1-…")
    expect("key_fields", bool(runtime.get("key_fields")), "a non-empty list")
    expect("versions.torch", bool(versions.get("torch")), "a version")
    if device_kind == "cuda":
        name, capability = str(runtime.get("device_name", "")), str(runtime.get("cuda_capability"))
        expect("device_name", bool(re.search(r"\(\d+ SMs\)$", name)), "'<GPU> (<n> SMs)'")
        expect("cuda_capability", bool(re.fullmatch(r"\d+\.\d+", capability)), "'<major>.<minor>'")
        expect("versions.cuda", bool(versions.get("cuda")), "a CUDA version")
        if expected and expected.get("kind") == "cuda":
            gpu = f"{expected.get('name')} ({expected.get('sm_count')} SMs)"
            expect("device_name", name == gpu, repr(gpu))
            expect("cuda_capability", capability == expected.get("compute_capability"),
                   repr(expected.get("compute_capability")))
            expect("versions.cuda", versions.get("cuda") == expected.get("cuda"), repr(expected.get("cuda")))
        expect("versions.cudnn", bool(versions.get("cudnn")), "a cuDNN version")
        expect("cublas_workspace_config", runtime.get("cublas_workspace_config") == CUBLAS_WORKSPACE_CONFIG,
               repr(CUBLAS_WORKSPACE_CONFIG))
        expect("attention_backend", runtime.get("attention_backend") == "sdpa-math", "'sdpa-math'")
    else:
        expect("device_name", bool(runtime.get("device_name")), "the CPU's name")
        expect("cpu_capability", bool(runtime.get("cpu_capability")), "torch's CPU capability")
        if expected and expected.get("cpu_capability"):
            expect("cpu_capability", runtime.get("cpu_capability") == expected["cpu_capability"],
                   repr(expected["cpu_capability"]))
        expect("torch_threads", runtime.get("torch_threads") == threads, str(threads))
    return problems


def device_info(device: str) -> dict[str, Any]:
    """This process's view of the device (imports torch): name, SMs, capability, memory, versions."""
    import platform

    import torch

    info: dict[str, Any] = {
        "kind": "cuda" if device.startswith("cuda") else "cpu",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if info["kind"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        from app.pipeline.determinism import _cpu_name

        info.update(name=_cpu_name(), cuda=None, cudnn=None)
    return info
