"""HTTP request and response models (unknown fields refused, bounds in Field)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.provenance.manifest import Manifest
from app.samplers import SamplerName

MAX_SEED = 2**53 - 1  # JavaScript clients keep every integer up to here exact
MAX_IMAGES = 8


class GenerationRequest(BaseModel):
    """POST /v1/generations: a prompt and every parameter; absent ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=20_000)

    model: Annotated[
        str | None,
        Field(description="Registry id; absent: the server's default model.", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$"),
    ] = None
    prompt: Annotated[str, Field(min_length=1, description="What to draw.")]
    negative_prompt: Annotated[str, Field(description="What to steer away from.")] = ""
    seed: Annotated[
        int | None,
        Field(ge=0, le=MAX_SEED, description="0..2^53-1; absent: the server draws one and returns it."),
    ] = None
    steps: Annotated[int | None, Field(ge=1, le=1000, description="Denoising steps (model limit applies).")] = None
    guidance_scale: Annotated[
        float | None, Field(ge=0, le=100, allow_inf_nan=False, description="Classifier-free guidance scale.")
    ] = None
    width: Annotated[int | None, Field(ge=8, le=8192, description="Pixels; a multiple of the model's size step.")] = (
        None
    )
    height: Annotated[int | None, Field(ge=8, le=8192, description="Pixels; a multiple of the model's size step.")] = (
        None
    )
    sampler: Annotated[SamplerName | None, Field(description="Sampler name; see GET /v1/samplers.")] = None
    num_images: Annotated[
        int, Field(ge=1, le=MAX_IMAGES, description="Image k uses seed + k, generated on its own.")
    ] = 1
    reproducibility_key: Annotated[
        str | None,
        Field(
            pattern=r"^rk1-[0-9a-f]{64}$",
            description="Run only on workers with this key (replays); 409 when none has it.",
        ),
    ] = None


class GeneratedImage(BaseModel):
    """One image of a generation response."""

    index: int
    seed: int
    png_base64: str
    latent_sha256: str
    pixel_sha256: str


class GenerationResponse(BaseModel):
    """200 answer to POST /v1/generations."""

    id: str
    images: list[GeneratedImage]
    manifest: Manifest


class ErrorDetail(BaseModel):
    """The body of every error."""

    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error body shape."""

    error: ErrorDetail


class WorkerStatus(BaseModel):
    """One worker as /readyz reports it."""

    id: str
    device: str
    state: str
    pid: int | None
    jobs_done: int
    restarts: int
    last_error: str | None
    torch_threads: int | None
    cpu_capability: str | None
    group_key: str | None
    models: dict[str, str | None] = Field(description="Loaded model id -> its reproducibility key.")
    ready_seconds: float | None


class ReadyResponse(BaseModel):
    """GET /readyz."""

    ready: bool
    draining: bool
    queue_depth: int
    workers: list[WorkerStatus]


class HealthResponse(BaseModel):
    """GET /healthz: the process is alive."""

    status: str
    version: str


class ModelInfo(BaseModel):
    """One registered model as GET /v1/models lists it."""

    id: str
    family: str
    description: str
    source_kind: str
    dtype: str
    default: bool
    defaults: dict[str, Any]
    limits: dict[str, Any]
    pinned_files: int


class ModelList(BaseModel):
    """GET /v1/models."""

    default_model: str
    models: list[ModelInfo]


class SamplerInfo(BaseModel):
    """One sampler as GET /v1/samplers lists it."""

    name: str
    scheduler_class: str
    description: str
    stochastic: bool
    overrides: dict[str, Any]


class SamplerList(BaseModel):
    """GET /v1/samplers."""

    samplers: list[SamplerInfo]
