"""The generation service: resolves parameters against the model, runs the work, builds and stores the proof."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequest, ModelNotFound, SameseedError
from app.models.registry import Registry
from app.params import MAX_SEED, GenerationParams
from app.provenance.hashes import latents_from_bytes
from app.provenance.manifest import Manifest, ManifestWarning, manifest_for
from app.scheduler.dispatcher import Disconnected, Dispatcher
from app.scheduler.work import Priority, Progress, Work
from app.store.archive import Archive
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import carrier, tracer
from app.timestamps import utc_now
from app.worker.messages import ImageRendered
from app.worker.pool import WorkerHandle

log = logging.getLogger("app.generation")

ProgressListener = Callable[[Work, Progress, dict[str, Any]], None]


def new_generation_id() -> str:
    """A fresh generation id (`gen_` and 32 hex digits)."""
    return f"gen_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Generation:
    """A finished generation: its parameters, the rendered images in index order and the manifest."""

    id: str
    params: GenerationParams
    images: list[ImageRendered]
    manifest: Manifest


@dataclass(frozen=True)
class RunningProgress:
    """How far the oldest running user job is: the fraction of its denoising steps done, and its current image."""

    job_id: str
    fraction: float
    elapsed_s: float
    image_index: int
    step: int
    steps: int
    jobs: int  # user jobs queued or running


@dataclass(frozen=True)
class StoredGeneration:
    """A generation after signing and storing: the signed manifest and the PNGs with it embedded."""

    generation: Generation
    manifest: Manifest
    pngs: list[bytes]


def resolve_params(
    registry: Registry,
    default_model: str,
    *,
    prompt: str,
    negative_prompt: str = "",
    model: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    sampler: str | None = None,
    num_images: int = 1,
) -> GenerationParams:
    """Fill defaults from the model and check the values against its limits (422 naming the field)."""
    model_id = model or default_model
    entry = registry.get(model_id)
    if entry is None:
        known = ", ".join(m.id for m in registry.models)
        raise ModelNotFound(f"model {model_id!r} is not registered; available: {known}", param="model")
    d, lim = entry.defaults, entry.limits
    width = width if width is not None else d.width
    height = height if height is not None else d.height
    for name, value in (("width", width), ("height", height)):
        if value % lim.size_multiple or not lim.min_size <= value <= lim.max_size:
            raise InvalidRequest(
                f"{name} must be a multiple of {lim.size_multiple} from {lim.min_size} to "
                f"{lim.max_size} for model {entry.id}; got {value}",
                param=name,
            )
    if width * height > lim.max_pixels:
        raise InvalidRequest(
            f"width*height must be at most {lim.max_pixels} pixels for model {entry.id}; "
            f"got {width}x{height} = {width * height}",
            param="width",
        )
    steps = steps if steps is not None else d.steps
    if not 1 <= steps <= lim.max_steps:
        raise InvalidRequest(
            f"steps must be from 1 to {lim.max_steps} for model {entry.id}; got {steps}", param="steps"
        )
    guidance = guidance_scale if guidance_scale is not None else d.guidance_scale
    if not 0 <= guidance <= lim.max_guidance_scale:
        raise InvalidRequest(
            f"guidance_scale must be from 0 to {lim.max_guidance_scale} for model {entry.id}; got {guidance}",
            param="guidance_scale",
        )
    last_seed = MAX_SEED - (num_images - 1)
    if seed is None:
        seed = secrets.randbelow(last_seed + 1)
    elif seed > last_seed:
        raise InvalidRequest(
            f"seed + num_images - 1 must stay at most {MAX_SEED} (2^53-1); with num_images="
            f"{num_images} the largest seed is {last_seed}; got {seed}",
            param="seed",
        )
    return GenerationParams(
        model=entry.id,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=float(guidance),
        width=width,
        height=height,
        sampler=sampler or d.sampler,
        num_images=num_images,
    )


class GenerationService:
    """Generations end to end: parameters, the dispatcher's work, the manifest, and the durable record."""

    def __init__(
        self,
        *,
        registry: Registry,
        default_model: str,
        dispatcher: Dispatcher,
        archive: Archive | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        self.dispatcher = dispatcher
        self.archive = archive
        self.metrics = metrics or dispatcher.metrics

    def resolve(self, **fields: Any) -> GenerationParams:  # noqa: ANN401 - the optional fields of resolve_params
        """The effective parameters of a request's fields (see `resolve_params`); counted as an outcome when refused."""
        try:
            return resolve_params(self.registry, self.default_model, **fields)
        except SameseedError as exc:
            self.metrics.jobs.labels(outcome=exc.type).inc()
            raise

    def workers(self) -> list[WorkerHandle]:
        """Every worker of this server, in id order."""
        return self.dispatcher.workers()

    def running_progress(self) -> RunningProgress | None:
        """The oldest started user job's progress (None when none runs): what A1111's progress poll shows."""
        jobs = self.dispatcher.in_flight(Priority.USER)
        running = [w for w in jobs if w.started_at is not None]
        if not running:
            return None
        work = min(running, key=lambda w: w.admitted)
        total = sum(p.steps for p in work.images)
        done = sum(min(work.steps_done.get(k, 0), p.steps) for k, p in enumerate(work.images))
        current = next((k for k in range(len(work.images)) if k not in work.results), len(work.images) - 1)
        return RunningProgress(
            job_id=work.id,
            fraction=done / total if total else 0.0,
            elapsed_s=time.monotonic() - work.admitted,
            image_index=current,
            step=work.steps_done.get(current, 0),
            steps=work.images[current].steps,
            jobs=len(jobs),
        )

    def has_key(self, model: str, key: str) -> bool:
        """Whether a worker serves `model` under reproducibility key `key`."""
        return any(w.models.get(model, {}).get("reproducibility_key") == key for w in self.workers())

    def submit(
        self,
        params: GenerationParams,
        *,
        work_id: str | None = None,
        reproducibility_key: str | None = None,
        received_at: str | None = None,
        on_progress: ProgressListener | None = None,
        previews: bool = False,
    ) -> Work:
        """Queue every image (image k with seed + k, on one key group); admission errors raise now.

        `previews` asks the workers for a low-resolution preview with each step (it never changes an image).
        """
        try:
            work = Work(
                id=work_id or new_generation_id(),
                images=tuple(params.image(k) for k in range(params.num_images)),
                priority=Priority.USER,
                group_key=self.dispatcher.group_for_key(params.model, reproducibility_key),
                received_at=received_at or utc_now(),
                on_progress=on_progress,
                trace_context=carrier(),
                previews=previews,
            )
            self.dispatcher.submit(work)
        except SameseedError as exc:
            self.metrics.jobs.labels(outcome=exc.type).inc()
            raise
        log.info("job admitted", extra={"generation_id": work.id, "model": params.model, "images": params.num_images})
        return work

    async def complete(
        self, work: Work, params: GenerationParams, *, disconnected: Disconnected | None = None
    ) -> Generation:
        """Wait for a submitted work item within its deadline and build the manifest; raises why not."""
        try:
            await self.dispatcher.wait(work, disconnected=disconnected)
        except SameseedError as exc:
            self.metrics.jobs.labels(outcome=exc.type).inc()
            raise
        self.metrics.jobs.labels(outcome="ok").inc()
        images = work.ordered_results()
        manifest = manifest_for(
            generation_id=work.id,
            params=params,
            rendered=images,
            received=work.received_at,
            started=work.started_at or work.received_at,
            finished=work.finished_at or utc_now(),
        )
        log.info(
            "job done", extra={"generation_id": work.id, "reproducibility_key": manifest.runtime.reproducibility_key}
        )
        return Generation(id=work.id, params=params, images=images, manifest=manifest)

    async def generate(
        self,
        params: GenerationParams,
        *,
        reproducibility_key: str | None = None,
        received_at: str | None = None,
        disconnected: Disconnected | None = None,
    ) -> Generation:
        """Render every image (image k with seed + k, on one key group) and build the manifest; raises why not."""
        with tracer().start_as_current_span("render images", attributes={"sameseed.model": params.model}) as span:
            work = self.submit(params, reproducibility_key=reproducibility_key, received_at=received_at)
            span.set_attributes({"sameseed.generation_id": work.id, "sameseed.images": params.num_images})
            return await self.complete(work, params, disconnected=disconnected)

    async def store(self, generation: Generation) -> StoredGeneration:
        """Sign, embed and store a generation durably: once this returns it survives SIGKILL."""
        assert self.archive is not None, "store() needs an archive"
        with tracer().start_as_current_span("sign and store"):
            archived = await asyncio.to_thread(
                self.archive.record,
                generation.manifest,
                [image.png for image in generation.images],
                [latents_from_bytes(image.latents, image.latent_shape) for image in generation.images],
            )
        return StoredGeneration(generation=generation, manifest=archived.manifest, pngs=list(archived.pngs))

    async def create(
        self,
        params: GenerationParams,
        *,
        reproducibility_key: str | None = None,
        received_at: str | None = None,
        disconnected: Disconnected | None = None,
        notes: Sequence[ManifestWarning] = (),
    ) -> StoredGeneration:
        """Generate, then sign, embed and store durably before answering: a returned generation survives SIGKILL.

        `notes` join the manifest's warnings before signing (what a front door accepted without effect).
        """
        with tracer().start_as_current_span("generation", attributes={"sameseed.model": params.model}):
            generation = await self.generate(
                params, reproducibility_key=reproducibility_key, received_at=received_at, disconnected=disconnected
            )
            if notes:  # recorded before signing: what a front door accepted without effect is part of the proof
                manifest = generation.manifest.model_copy(update={"warnings": [*generation.manifest.warnings, *notes]})
                generation = dataclasses.replace(generation, manifest=manifest)
            return await self.store(generation)
