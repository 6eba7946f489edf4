"""The provenance manifest (versioned schema) and its canonical JSON form.

Format 2 (`sameseed.manifest/2`, what the service writes) is signed over RFC 8785 canonical bytes
and keeps non-finite floats losslessly as `{"$float": ...}` (see `app.provenance.canonical`);
format 1 was signed over Python's `canonical_json`, where such floats had become `null`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from app.params import STRICT, GenerationParams, ImageHashes
from app.provenance.canonical import encode_floats

MANIFEST_FORMAT_1 = "sameseed.manifest/1"
MANIFEST_FORMAT = "sameseed.manifest/2"
MANIFEST_FORMATS = (MANIFEST_FORMAT_1, MANIFEST_FORMAT)


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys, no whitespace and no NaN: the bytes that get hashed and signed."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _refuse_constant(name: str) -> Any:
    """Python's json accepts NaN and Infinity; the service's JSON does not."""
    raise ValueError(f"{name} is not JSON (canonical JSON has no NaN or Infinity)")


def parse_json(text: str | bytes) -> Any:
    """Parse standard JSON only: ValueError on NaN/Infinity, invalid text or nesting too deep to parse."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestScheduler(_Part):
    """The scheduler the request ran with: diffusers class and its full config."""

    class_name: str
    config: dict[str, Any]

    # Diffusers configs hold -inf (DPM-Solver's lambda_min_clipped): keep it, not JSON's null.
    @field_validator("config", mode="before")
    @classmethod
    def _keep_floats(cls, value: Any) -> Any:
        return encode_floats(value)


class ManifestModel(_Part):
    """Model identity: where it was loaded from and the sha256 of every file."""

    id: str
    family: str
    source_kind: Literal["local", "hub", "build", "single_file"]
    source: str = Field(description="The local folder (or single-file checkpoint) the pipeline was loaded from.")
    hub_repo: str | None = None
    hub_revision: str | None = None
    hub_filename: str | None = Field(default=None, description="The single-file checkpoint of the hub repo.")
    config_source: str | None = Field(
        default=None, description="The diffusers-format config folder a single-file checkpoint was loaded with."
    )
    vae_source: str | None = Field(default=None, description="The folder of a replacement VAE (vae_override/ files).")
    pipeline: str
    dtype: str
    files: dict[str, str] = Field(description="Relative path -> sha256 of every component file.")
    scheduler_config: dict[str, Any] = Field(description="The model's own scheduler config.")

    @field_validator("scheduler_config", mode="before")
    @classmethod
    def _keep_floats(cls, value: Any) -> Any:
        return encode_floats(value)


class ManifestRuntime(BaseModel):
    """The runtime fingerprint of the worker that made the images (open for extra fields)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    device_kind: Literal["cpu", "cuda"]
    device_name: str
    cpu_capability: str
    cuda_capability: str | None = None
    torch_threads: int
    mkldnn: bool
    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    tf32_matmul: bool
    tf32_cudnn: bool
    cublas_workspace_config: str | None
    attention_backend: str
    noise_device: Literal["cpu"]
    versions: dict[str, str | None]
    image: dict[str, str] | None = Field(
        default=None, description="The container image (version, revision, base); not part of the key."
    )
    worker_id: str
    reproducibility_key: str
    key_fields: list[str] = Field(description="Runtime fields that enter the reproducibility key.")


@dataclass(frozen=True, config=STRICT)
class ManifestImage(ImageHashes):
    """One image as the manifest records it: its hashes, the worker that made it, the VAE guard's verdict."""

    worker_id: str
    vae_upcast: bool = Field(
        default=False, description="The VAE gave NaN/Inf in the model dtype; these pixels were decoded in float32."
    )
    cobatched_with: int = Field(
        default=0,
        description="How many other images shared this image's pipeline call (0: made alone). Provenance only, "
        "not a key field: a co-batched image is bitwise its single run (the worker proved it for this shape).",
    )


class ManifestWarning(_Part):
    """Something the service decided or noticed that a user should know about."""

    code: str
    message: str
    param: str | None = None


class ManifestTimestamps(_Part):
    """UTC ISO-8601 times the request was received, started and finished."""

    received: str
    started: str
    finished: str


class ManifestSignature(_Part):
    """Ed25519 signature over the canonical bytes of the manifest without this field (format 2: RFC 8785)."""

    algorithm: Literal["ed25519"]
    key_id: str = Field(description="First 16 hex digits of sha256 of the raw public key (GET /v1/keys).")
    value: str = Field(description="Base64 of the 64-byte signature.")


class Manifest(_Part):
    """Everything that made a generation, in a versioned schema."""

    format: Literal["sameseed.manifest/1", "sameseed.manifest/2"] = MANIFEST_FORMAT
    id: str
    service: dict[str, str]
    timestamps: ManifestTimestamps
    request: GenerationParams = Field(description="Every effective generation parameter, defaults filled in.")
    scheduler: ManifestScheduler
    model: ManifestModel
    runtime: ManifestRuntime
    images: list[ManifestImage]
    warnings: list[ManifestWarning]
    conditioning: dict[str, Any] | None = Field(
        default=None, description="Extra conditioning passed to the pipeline (SDXL: size and crop), as passed."
    )
    signature: ManifestSignature | None = None

    @field_validator("conditioning", mode="before")
    @classmethod
    def _keep_floats(cls, value: Any) -> Any:
        return encode_floats(value)

    def canonical(self) -> bytes:
        """The canonical JSON bytes of this manifest."""
        return canonical_json(self.model_dump(mode="json"))


class RenderedImage(Protocol):
    """What the manifest needs of one rendered image (the worker's ImageRendered message has it)."""

    image: ManifestImage
    model: dict[str, Any]
    scheduler: dict[str, Any]
    runtime: dict[str, Any]
    warnings: tuple[dict[str, Any], ...]
    conditioning: dict[str, Any] | None


def manifest_for(
    *,
    generation_id: str,
    params: GenerationParams,
    rendered: Sequence[RenderedImage],
    received: str,
    started: str,
    finished: str,
) -> Manifest:
    """The manifest of a generation from its parameters and its rendered images (in index order)."""
    first = rendered[0]
    warnings: list[dict[str, Any]] = []
    for image in rendered:  # every image shares the prompt: keep each distinct warning once
        warnings.extend(w for w in image.warnings if w not in warnings)
    return build_manifest(
        generation_id=generation_id,
        request=params,
        model=first.model,
        scheduler=first.scheduler,
        runtime=first.runtime,
        images=[image.image for image in rendered],
        warnings=warnings,
        conditioning=first.conditioning,
        received=received,
        started=started,
        finished=finished,
    )


def build_manifest(
    *,
    generation_id: str,
    request: GenerationParams,
    model: dict[str, Any],
    scheduler: dict[str, Any],
    runtime: dict[str, Any],
    images: list[ManifestImage],
    warnings: list[dict[str, Any]],
    conditioning: dict[str, Any] | None = None,
    received: str,
    started: str,
    finished: str,
) -> Manifest:
    """Assemble and validate a manifest from the parameters and what the worker recorded."""
    import app

    return Manifest(
        id=generation_id,
        service={"name": "sameseed", "version": app.__version__},
        timestamps=ManifestTimestamps(received=received, started=started, finished=finished),
        request=request,
        scheduler=ManifestScheduler(**scheduler),
        model=ManifestModel(**model),
        runtime=ManifestRuntime(**runtime),
        images=images,
        warnings=[ManifestWarning(**w) for w in warnings],
        conditioning=conditioning,
    )
