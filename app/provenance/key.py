"""The reproducibility key: a hash of model identity and the runtime fields that change bits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from app.provenance.manifest import canonical_json

KEY_VERSION = "rk1"

# Runtime fields that change latents or pixels (DESIGN.md, measured); `versions` enters by the
# subset below. The worker id, pid and Python version do not enter the key.
KEY_RUNTIME_FIELDS: tuple[str, ...] = (
    "device_kind",
    "device_name",
    "cpu_capability",
    "cuda_capability",
    "torch_threads",
    "mkldnn",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "tf32_matmul",
    "tf32_cudnn",
    "attention_backend",
    "noise_device",
)
KEY_VERSION_FIELDS: tuple[str, ...] = ("torch", "diffusers", "transformers", "cuda", "cudnn")


def key_material(
    *, files: Mapping[str, str], pipeline: str, dtype: str, runtime: Mapping[str, Any]
) -> dict[str, Any]:
    """The exact document whose canonical JSON the key hashes (model identity + runtime fields)."""
    versions = runtime.get("versions", {})
    return {
        "key_version": KEY_VERSION,
        "model": {"files": dict(sorted(files.items())), "pipeline": pipeline, "dtype": dtype},
        "runtime": {name: runtime.get(name) for name in KEY_RUNTIME_FIELDS},
        "versions": {name: versions.get(name) for name in KEY_VERSION_FIELDS},
    }


def reproducibility_key(
    *, files: Mapping[str, str], pipeline: str, dtype: str, runtime: Mapping[str, Any]
) -> str:
    """Return "rk1-" + sha256 hex of the canonical key material; equal keys promise equal bits."""
    material = key_material(files=files, pipeline=pipeline, dtype=dtype, runtime=runtime)
    return f"{KEY_VERSION}-{hashlib.sha256(canonical_json(material)).hexdigest()}"


def runtime_group_key(runtime: Mapping[str, Any]) -> str:
    """A hash of the runtime part alone: workers with equal group keys give equal bits for any model."""
    versions = runtime.get("versions", {})
    material = {
        "runtime": {name: runtime.get(name) for name in KEY_RUNTIME_FIELDS},
        "versions": {name: versions.get(name) for name in KEY_VERSION_FIELDS},
    }
    return hashlib.sha256(canonical_json(material)).hexdigest()[:16]
