"""The worker plan, read once at start-up: the registry, the default model, one config per device (no web imports)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from app.models.registry import Registry, load_registry
from app.settings import Settings
from app.worker.messages import WorkerConfig


def visible_gpus() -> list[str]:
    """Physical indices of the NVIDIA GPUs this host shows (without importing torch)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def plan_devices(workers: str) -> list[str]:
    """Turn SAMESEED_WORKERS into one device string per worker; `cuda` without GPUs fails fast."""
    if workers.startswith("cpu:"):
        return ["cpu"] * int(workers.split(":", 1)[1])
    gpus = visible_gpus()
    if workers == "cuda" and not gpus:
        raise RuntimeError("SAMESEED_WORKERS=cuda but no NVIDIA GPU is visible (nvidia-smi found none)")
    return [f"cuda:{index}" for index in gpus] or ["cpu"]


def worker_configs(settings: Settings, default_model: str, devices: list[str] | None = None) -> list[WorkerConfig]:
    """One picklable config per worker, from SAMESEED_WORKERS (or `devices`, e.g. a Ray cluster's) and the threads."""
    return [
        WorkerConfig(
            worker_id=f"w{i}",
            device=device,
            cpu_threads=settings.cpu_threads,
            cpu_mkldnn=settings.cpu_mkldnn,
            registry_path=settings.models,
            data_dir=settings.data_dir.resolve(),
            preload=(default_model,),
            allow_download=settings.allow_download,
            log_level=settings.log_level,
            image=settings.image_identity(),
            batch_sizes=tuple(range(2, settings.max_batch + 1)),
            batch_proof_steps=settings.batch_proof_steps,
            batch_proof_dir=(settings.batch_proof_dir or settings.data_dir / "cobatch-proofs").resolve(),
        )
        for i, device in enumerate(plan_devices(settings.workers) if devices is None else devices)
    ]


@dataclass(frozen=True)
class Startup:
    """What start-up reads once: the registry, the default model and one config per worker."""

    registry: Registry
    default_model: str
    configs: list[WorkerConfig]


def prepare(settings: Settings, devices: list[str] | None = None) -> Startup:
    """Load and check the registry and plan the workers (`cuda` without GPUs fails here, before serving).

    `devices` overrides the local plan (the replicas of a Ray cluster, app.worker.ray_pool.plan_replicas).
    """
    registry = load_registry(settings.models)
    default_model = settings.default_model or registry.default_model
    if registry.get(default_model) is None:
        raise ValueError(f"SAMESEED_DEFAULT_MODEL={default_model!r} is not in the registry {settings.models}")
    return Startup(registry, default_model, worker_configs(settings, default_model, devices))
