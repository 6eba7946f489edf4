"""Messages between the server and its worker processes: frozen dataclasses grouped by direction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.params import GenerationParams
from app.provenance.manifest import ManifestImage

# ---------------------------------------------------------------- configuration (parent -> child)


@dataclass(frozen=True)
class WorkerConfig:
    """The small picklable config a worker process starts with (never the settings object)."""

    worker_id: str
    device: str  # "cpu" or "cuda:N"
    cpu_threads: int
    cpu_mkldnn: bool
    registry_path: Path
    data_dir: Path
    preload: tuple[str, ...]
    allow_download: bool
    log_level: str = "info"
    engine: str = "app.worker.engine:DiffusersEngine"  # module:class; tests name fixture engines
    image: dict[str, str] | None = None  # the container image (version, revision, base): runtime.image, not keyed
    # co-batching: the batch sizes to prove at start (empty: off), and the denoising steps each proof image takes
    batch_sizes: tuple[int, ...] = ()
    batch_proof_steps: int = 2
    batch_proof_dir: Path | None = None  # proofs kept across starts (None: prove at every start)


# ---------------------------------------------------------------- requests (parent -> child)


@dataclass(frozen=True)
class RenderImage:
    """Generate image `index` of job `job_id` at batch size 1 with `params` (that image's own seed)."""

    job_id: str
    index: int
    params: GenerationParams
    check: bool = False  # a golden-check image: judged by the monitor, not counted as user work
    trace_context: dict[str, str] | None = None  # W3C trace context of the generation (tracing on)
    previews: bool = False  # send a low-resolution preview with each step (never part of the image or its hashes)


@dataclass(frozen=True)
class RenderBatch:
    """Generate compatible images (same model, size, steps, sampler, guidance) in one pipeline call.

    Each image is answered on its own (ImageRendered, ImageFailed or ImageCanceled, in `images`
    order); a worker that has not proven this (model, size, batch size) renders them one by one.
    """

    images: tuple[RenderImage, ...]


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more; exit the worker loop."""

    reason: str = "shutdown"


# ---------------------------------------------------------------- events (child -> parent)


@dataclass(frozen=True)
class WorkerReady:
    """The worker configured torch and loaded its preloaded models."""

    worker_id: str
    pid: int
    runtime: dict[str, Any]
    group_key: str
    models: dict[str, dict[str, Any]]  # model id -> {reproducibility_key, ...}
    load_seconds: float
    # the co-batching proof per (model, width, height, size): {model, width, height, size, proven, reason, seconds}
    cobatch: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class WorkerFailed:
    """The worker cannot start (bad model, bad device); it exits after sending this."""

    worker_id: str
    error_type: str
    message: str


@dataclass(frozen=True)
class ImageRendered:
    """One finished image with its hashes, PNG bytes and the identity of what made it."""

    job_id: str
    image: ManifestImage  # index, seed, size, hashes, worker, VAE guard verdict
    png: bytes
    seconds: float
    model: dict[str, Any]
    scheduler: dict[str, Any]
    runtime: dict[str, Any]
    warnings: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    model_loaded: dict[str, Any] | None = None
    conditioning: dict[str, Any] | None = None  # SDXL size/crop micro-conditioning, as passed
    latents: bytes = b""  # final latents, float32 C-order (sha256 of these bytes == latent_sha256)
    latent_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ImageFailed:
    """The image could not be made; `error_type` names an API error type. The worker keeps serving."""

    job_id: str
    index: int
    worker_id: str
    error_type: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class ImageStep:
    """Progress of the image being rendered: denoising step `step` of `steps` finished (read-only report)."""

    job_id: str
    index: int
    worker_id: str
    step: int
    steps: int
    preview_png: bytes | None = None  # a small PNG approximated from the latents (RenderImage.previews only)


@dataclass(frozen=True)
class ImageCanceled:
    """The parent canceled this image's job: rendering stopped after `steps_done` steps; nothing was kept."""

    job_id: str
    index: int
    worker_id: str
    steps_done: int


ToWorker = RenderImage | RenderBatch | Shutdown
FromWorker = WorkerReady | WorkerFailed | ImageRendered | ImageFailed | ImageStep | ImageCanceled
