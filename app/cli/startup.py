"""Serve wiring read once at start-up: the registry, the default model and the worker plan (no web imports)."""

from __future__ import annotations

from dataclasses import dataclass

from app.models.registry import Registry, load_registry
from app.settings import Settings
from app.worker.messages import WorkerConfig
from app.worker.pool import worker_configs


@dataclass(frozen=True)
class Startup:
    """What start-up reads once: the registry, the default model and one config per worker."""

    registry: Registry
    default_model: str
    configs: list[WorkerConfig]


def prepare(settings: Settings) -> Startup:
    """Load and check the registry and plan the workers (`cuda` without GPUs fails here, before serving)."""
    registry = load_registry(settings.models)
    default_model = settings.default_model or registry.default_model
    if registry.get(default_model) is None:
        raise ValueError(f"SAMESEED_DEFAULT_MODEL={default_model!r} is not in the registry {settings.models}")
    return Startup(registry, default_model, worker_configs(settings, default_model))
