"""The dispatcher: admits requests into a bounded queue, routes images to workers, gathers results.

One image is one unit of work. A job's images all run inside one group of workers that share a
runtime fingerprint, so an n-image request is bitwise equal to n single requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from app.errors import (
    InvalidRequest,
    JobTimeout,
    ModelNotFound,
    NotReady,
    QueueFull,
    SameseedError,
    WorkerLost,
    error_from_type,
)
from app.provenance.manifest import Manifest
from app.registry import Registry
from app.schemas import MAX_SEED, GenerationRequest
from app.worker.messages import ImageFailed, ImageRendered, RenderImage, WorkerFailed, WorkerReady
from app.worker.pool import WorkerExited, WorkerHandle, WorkerState

log = logging.getLogger("app.dispatcher")

MAX_ATTEMPTS = 2  # an image whose worker died is retried once: safe, the result is deterministic


@dataclass(frozen=True)
class EffectiveRequest:
    """A request with every default filled in and every limit checked."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str
    num_images: int


def resolve_request(registry: Registry, default_model: str, request: GenerationRequest) -> EffectiveRequest:
    """Fill defaults from the model and check the request against its limits (422 naming the field)."""
    model_id = request.model or default_model
    entry = registry.get(model_id)
    if entry is None:
        known = ", ".join(m.id for m in registry.models)
        raise ModelNotFound(f"model {model_id!r} is not registered; available: {known}", param="model")
    d, lim = entry.defaults, entry.limits
    width = request.width if request.width is not None else d.width
    height = request.height if request.height is not None else d.height
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
    steps = request.steps if request.steps is not None else d.steps
    if steps > lim.max_steps:
        raise InvalidRequest(
            f"steps must be from 1 to {lim.max_steps} for model {entry.id}; got {steps}", param="steps"
        )
    guidance = request.guidance_scale if request.guidance_scale is not None else d.guidance_scale
    if guidance > lim.max_guidance_scale:
        raise InvalidRequest(
            f"guidance_scale must be from 0 to {lim.max_guidance_scale} for model {entry.id}; got {guidance}",
            param="guidance_scale",
        )
    last_seed = MAX_SEED - (request.num_images - 1)
    if request.seed is None:
        seed = secrets.randbelow(last_seed + 1)
    elif request.seed > last_seed:
        raise InvalidRequest(
            f"seed + num_images - 1 must stay at most {MAX_SEED} (2^53-1); with num_images="
            f"{request.num_images} the largest seed is {last_seed}; got {request.seed}",
            param="seed",
        )
    else:
        seed = request.seed
    return EffectiveRequest(
        model=entry.id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=float(guidance),
        width=width,
        height=height,
        sampler=request.sampler or d.sampler,
        num_images=request.num_images,
    )


def utc_now() -> str:
    """The current UTC time in ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One generation request in flight."""

    id: str
    request: EffectiveRequest
    received_at: str
    future: asyncio.Future[Job]
    started_at: str | None = None
    group_key: str | None = None
    results: dict[int, ImageRendered] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    finished_at: str | None = None

    @property
    def done(self) -> bool:
        """Whether the job has its answer (result or error)."""
        return self.future.done()


@dataclass
class Outcome:
    """A finished generation: the images in index order and the manifest."""

    id: str
    images: list[ImageRendered]
    manifest: Manifest


class Pool(Protocol):
    """What the dispatcher needs of a worker pool (the real one, or a fake in unit tests)."""

    workers: dict[str, WorkerHandle]

    def start(self) -> None:
        """Start every worker (from the running event loop)."""

    def send(self, handle: WorkerHandle, message: Any) -> bool:
        """Send a message to one worker; False when it cannot be delivered."""

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every worker within `timeout_s`."""


class Dispatcher:
    """Bounded admission, per-image routing within a fingerprint group, retries and deadlines."""

    def __init__(
        self,
        *,
        registry: Registry,
        default_model: str,
        max_queue: int,
        job_timeout_s: float,
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.pool: Pool | None = None
        self._pending: deque[tuple[Job, int]] = deque()
        self._jobs: dict[str, Job] = {}
        self._image_seconds = 1.0  # running estimate for Retry-After
        self._accepting = True

    # ------------------------------------------------------------------ lifecycle
    def attach(self, pool: Pool) -> None:
        """Use this pool; its events must be delivered to `on_event`."""
        self.pool = pool

    async def close(self) -> None:
        """Stop accepting, fail what is left, stop the workers."""
        self._accepting = False
        for job in list(self._jobs.values()):
            self._fail(job, NotReady("the server is shutting down"))
        if self.pool is not None:
            await self.pool.stop()

    # ------------------------------------------------------------------ status
    def workers(self) -> list[WorkerHandle]:
        """All worker handles, in id order."""
        return sorted(self.pool.workers.values(), key=lambda w: w.id) if self.pool else []

    def ready(self) -> bool:
        """True when at least one worker has its pipeline loaded and can take work."""
        return any(w.state in (WorkerState.READY, WorkerState.BUSY) for w in self.workers())

    def waiting_jobs(self) -> int:
        """Jobs admitted but not yet started."""
        return sum(1 for j in self._jobs.values() if j.started_at is None)

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest, *, received_at: str | None = None) -> Outcome:
        """Run a generation to completion; raises a SameseedError with the reason otherwise."""
        received = received_at or utc_now()
        effective = resolve_request(self.registry, self.default_model, request)
        self._admit()
        job = Job(
            id=f"gen_{uuid.uuid4().hex}",
            request=effective,
            received_at=received,
            future=asyncio.get_running_loop().create_future(),
        )
        self._jobs[job.id] = job
        self._pending.extend((job, k) for k in range(effective.num_images))
        log.info(
            "job admitted", extra={"generation_id": job.id, "model": effective.model, "images": effective.num_images}
        )
        self._pump()
        try:
            await asyncio.wait_for(asyncio.shield(job.future), timeout=self.job_timeout_s)
        except TimeoutError:
            self._fail(
                job,
                JobTimeout(
                    f"generation {job.id} passed its deadline of {self.job_timeout_s:g}s "
                    f"({'started' if job.started_at else 'never started'})"
                ),
            )
        finally:
            self._forget(job)  # a cancelled request (client gone) frees its place
        job.future.result()  # raises the job's error
        return self._outcome(job)

    def _admit(self) -> None:
        if not self._accepting:
            raise NotReady("the server is shutting down and accepts no new work")
        usable = [w for w in self.workers() if w.state not in (WorkerState.FAILED, WorkerState.STOPPED)]
        if not usable:
            reasons = "; ".join(f"{w.id}: {w.last_error}" for w in self.workers()) or "no workers configured"
            raise NotReady(f"no worker can serve requests ({reasons})")
        if self.waiting_jobs() >= self.max_queue:
            raise QueueFull(
                f"the queue is full ({self.max_queue} requests waiting); retry later",
                retry_after_s=math.ceil(self._estimated_wait_s()),
            )

    def _estimated_wait_s(self) -> float:
        ready = max(1, sum(1 for w in self.workers() if w.state in (WorkerState.READY, WorkerState.BUSY)))
        return len(self._pending) * self._image_seconds / ready

    # ------------------------------------------------------------------ routing
    def _pump(self) -> None:
        """Give each idle ready worker the oldest image it may run (same group as its job)."""
        if self.pool is None:
            return
        for worker in self.workers():
            if worker.state is not WorkerState.READY or not self._pending:
                continue
            task = next(
                (t for t in self._pending if t[0].group_key in (None, worker.group_key) and not t[0].done),
                None,
            )
            if task is None:
                continue
            self._pending.remove(task)
            self._dispatch(worker, *task)
        # drop tasks of jobs that already ended
        self._pending = deque(t for t in self._pending if not t[0].done)

    def _dispatch(self, worker: WorkerHandle, job: Job, index: int) -> None:
        request = job.request
        job.group_key = job.group_key or worker.group_key
        job.started_at = job.started_at or utc_now()
        job.attempts[index] = job.attempts.get(index, 0) + 1
        message = RenderImage(
            job_id=job.id,
            index=index,
            model=request.model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=request.seed + index,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            sampler=request.sampler,
        )
        worker.state, worker.current = WorkerState.BUSY, (job, index, time.monotonic())
        assert self.pool is not None
        if not self.pool.send(worker, message):
            worker.current = None
            self._pending.appendleft((job, index))  # the exit event will follow and restart it

    # ------------------------------------------------------------------ events
    def on_event(self, worker: WorkerHandle, event: Any) -> None:
        """Handle one worker event (on the event loop thread)."""
        if isinstance(event, ImageRendered):
            self._on_image(worker, event)
        elif isinstance(event, ImageFailed):
            self._on_image_failed(worker, event)
        elif isinstance(event, WorkerExited):
            self._on_worker_exit(worker)
        elif isinstance(event, (WorkerReady, WorkerFailed)):
            if not self.ready() and not any(w.state is WorkerState.STARTING for w in self.workers()):
                for job in list(self._jobs.values()):
                    self._fail(job, NotReady(f"no worker can serve requests ({worker.last_error})"))
        self._pump()

    def _release(self, worker: WorkerHandle) -> tuple[Job, int] | None:
        current, worker.current = worker.current, None
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.READY
        if current is None:
            return None
        job, index, started = current
        elapsed = time.monotonic() - started
        self._image_seconds = 0.8 * self._image_seconds + 0.2 * elapsed
        return job, index

    def _on_image(self, worker: WorkerHandle, event: ImageRendered) -> None:
        self._release(worker)
        worker.jobs_done += 1
        if event.model_loaded:
            worker.models[event.model_loaded["model"]] = event.model_loaded
        job = self._jobs.get(event.job_id)
        if job is None or job.done:
            return
        job.results[event.index] = event
        if len(job.results) == job.request.num_images:
            keys = {r.runtime["reproducibility_key"] for r in job.results.values()}
            if len(keys) != 1:  # cannot happen inside one group; refuse rather than mix keys
                self._fail(job, WorkerLost(f"images of {job.id} came from different reproducibility keys"))
                return
            job.finished_at = utc_now()
            job.future.set_result(job)

    def _on_image_failed(self, worker: WorkerHandle, event: ImageFailed) -> None:
        self._release(worker)
        job = self._jobs.get(event.job_id)
        if job is not None:
            self._fail(job, error_from_type(event.error_type, event.message, event.param))

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        current = self._release(worker)
        if current is None:
            return
        job, index = current
        if job.done:
            return
        if job.attempts.get(index, 0) < MAX_ATTEMPTS:
            log.warning(
                "worker %s died mid-image; retrying image %d", worker.id, index, extra={"generation_id": job.id}
            )
            self._pending.appendleft((job, index))
        else:
            self._fail(job, WorkerLost(f"the worker died twice while generating image {index} of {job.id}"))

    # ------------------------------------------------------------------ endings
    def _fail(self, job: Job, error: SameseedError) -> None:
        if not job.future.done():
            job.future.set_exception(error)
            log.warning("job failed: %s", error.message, extra={"generation_id": job.id, "error_type": error.type})

    def _forget(self, job: Job) -> None:
        if not job.future.done():
            job.future.cancel()
        with contextlib.suppress(KeyError):
            del self._jobs[job.id]
        self._pending = deque(t for t in self._pending if t[0] is not job)

    def _outcome(self, job: Job) -> Outcome:
        from app.provenance.manifest import build_manifest

        images = [job.results[k] for k in range(job.request.num_images)]
        first = images[0]
        warnings: list[dict[str, Any]] = []
        for image in images:  # every image shares the prompt: keep each distinct warning once
            warnings.extend(w for w in image.warnings if w not in warnings)
        manifest = build_manifest(
            generation_id=job.id,
            request=vars(job.request),
            model=first.model,
            scheduler=first.scheduler,
            runtime=first.runtime,
            images=[
                {
                    "index": image.index,
                    "seed": image.seed,
                    "latent_sha256": image.latent_sha256,
                    "pixel_sha256": image.pixel_sha256,
                    "width": image.width,
                    "height": image.height,
                    "worker_id": image.worker_id,
                }
                for image in images
            ],
            warnings=warnings,
            received=job.received_at,
            started=job.started_at or job.received_at,
            finished=job.finished_at or utc_now(),
        )
        log.info(
            "job done", extra={"generation_id": job.id, "reproducibility_key": manifest.runtime.reproducibility_key}
        )
        return Outcome(id=job.id, images=images, manifest=manifest)
