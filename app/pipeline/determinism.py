"""Worker-start determinism settings and the runtime fingerprint they produce."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def prepare_environment(device: str, cpu_threads: int) -> None:
    """Set the environment torch reads at import; must run before torch is first imported."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]  # the child sees only its GPU
    if device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads)
        os.environ["MKL_NUM_THREADS"] = str(cpu_threads)


def torch_device(device: str) -> str:
    """The torch device string inside the worker ("cuda:3" becomes "cuda": it sees one GPU)."""
    return "cuda" if device.startswith("cuda") else "cpu"


def configure_torch(device: str, cpu_threads: int, cpu_mkldnn: bool) -> None:
    """Turn on every determinism switch and pin the thread count for this process."""
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device == "cpu":
        torch.set_num_threads(cpu_threads)
        torch.backends.mkldnn.enabled = cpu_mkldnn
    else:
        # One explicit SDPA backend on GPU: math is the one with a deterministic backward-free path
        # on every architecture; flash/mem-efficient kernels differ by GPU generation.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def runtime_fingerprint(device: str, worker_id: str, image: dict[str, str] | None = None) -> dict[str, Any]:
    """Describe this process's compute runtime: every field that can change bits, versions, and the image.

    `image` (the container image's version, source revision and base) is provenance only: it is not
    one of the key fields, so rebuilding an image with the same libraries keeps every key.
    """
    import torch

    import app

    cuda = device.startswith("cuda")
    if cuda:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        device_name = f"{props.name} ({props.multi_processor_count} SMs)"
        cuda_capability = f"{props.major}.{props.minor}"
        cudnn = torch.backends.cudnn.version()
    else:
        device_name, cuda_capability, cudnn = _cpu_name(), None, None
    # torch.__version__ is a str subclass from torch.torch_version: kept as one, the server process that
    # unpickles this fingerprint would import all of torch (seconds of CPU, hundreds of MB) to rebuild it.
    torch_version = str(torch.__version__)
    return {
        "device_kind": "cuda" if cuda else "cpu",
        "device_name": device_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_capability": cuda_capability,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "attention_backend": "sdpa-math" if cuda else "sdpa-cpu",
        "noise_device": "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch_version,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "safetensors": _version("safetensors"),
            "numpy": _version("numpy"),
            "pillow": _version("pillow"),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": str(cudnn) if cudnn else None,
            "sameseed": app.__version__,
        },
        "image": dict(image) if image else None,
        "worker_id": worker_id,
        "pid": os.getpid(),
    }
