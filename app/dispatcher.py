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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from app.consistency import ConsistencyMonitor, GoldenRun, WorkerConsistency
from app.errors import (
    ClientDisconnected,
    InvalidRequest,
    JobTimeout,
    KeyUnavailable,
    ModelNotFound,
    NotReady,
    QueueFull,
    SameseedError,
    WorkerLost,
    error_from_type,
)
from app.metrics import Metrics
from app.provenance.manifest import Manifest
from app.registry import Registry
from app.schemas import MAX_SEED, GenerationRequest
from app.worker.messages import ImageFailed, ImageRendered, RenderImage, WorkerReady
from app.worker.pool import WorkerExited, WorkerHandle, WorkerState

log = logging.getLogger("app.dispatcher")

MAX_ATTEMPTS = 2  # an image whose worker died is retried once: safe, the result is deterministic
SERVING = (WorkerState.READY, WorkerState.BUSY)
COMING = (WorkerState.STARTING, WorkerState.RESTARTING)


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
    admitted: float = field(default_factory=time.monotonic)
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


Disconnected = Callable[[], Awaitable[bool]]
DISCONNECT_POLL_S = 0.25


class Dispatcher:
    """Bounded admission, per-image routing within a fingerprint group, retries, deadlines and drain."""

    def __init__(
        self,
        *,
        registry: Registry,
        default_model: str,
        max_queue: int,
        job_timeout_s: float,
        metrics: Metrics | None = None,
        consistency: ConsistencyMonitor | None = None,
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.metrics = metrics or Metrics()
        self.metrics.queue_limit.set(max_queue)
        self.consistency = consistency
        self.pool: Pool | None = None
        self.draining = False
        self._pending: deque[tuple[Job, int]] = deque()
        self._jobs: dict[str, Job] = {}
        self._image_seconds = 1.0  # running estimate for Retry-After
        self._busy_s: dict[str, float] = {}
        self._restarts_seen: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._checks: dict[str, GoldenRun] = {}  # golden runs in flight, by run id
        self._check_done: dict[str, asyncio.Future[WorkerConsistency | None]] = {}
        self._quarantined: set[str] = set()
        self._periodic: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self, pool: Pool) -> None:
        """Use this pool; its events must be delivered to `on_event`."""
        self.pool = pool
        self._sync_metrics()

    def begin_drain(self) -> None:
        """Refuse new requests (503) and report not ready; admitted jobs keep running."""
        if not self.draining:
            self.draining = True
            log.info("draining: %d jobs in flight", len(self._jobs))

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for admitted jobs to finish; fail the rest. Returns how many failed."""
        self.begin_drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        left = [job for job in self._jobs.values() if not job.done]
        for job in left:
            self._fail(job, NotReady(f"the server shut down before {job.id} finished (drain {grace_s:g}s)"))
        return len(left)

    async def close(self) -> None:
        """Stop accepting, fail what is left, stop the workers."""
        self.draining = True
        if self._periodic is not None:
            self._periodic.cancel()
        for job in list(self._jobs.values()):
            self._fail(job, NotReady("the server is shutting down"))
        if self.pool is not None:
            await self.pool.stop()
            self._sync_metrics()

    # ------------------------------------------------------------------ status
    def workers(self) -> list[WorkerHandle]:
        """All worker handles, in id order."""
        return sorted(self.pool.workers.values(), key=lambda w: w.id) if self.pool else []

    def ready(self) -> bool:
        """True when not draining and at least one worker has its pipeline loaded and takes work."""
        return not self.draining and any(w.state in SERVING for w in self.workers())

    def consistency_state(self, worker_id: str) -> str | None:
        """A worker's golden-check state, or None when checks are off."""
        return self.consistency.worker(worker_id).state if self.consistency is not None else None

    def checks_in_flight(self) -> int:
        """Golden runs queued or running."""
        return len(self._checks)

    def waiting_jobs(self) -> int:
        """Jobs admitted but not yet started."""
        return sum(1 for j in self._jobs.values() if j.started_at is None)

    # ------------------------------------------------------------------ requests
    async def generate(
        self,
        request: GenerationRequest,
        *,
        received_at: str | None = None,
        disconnected: Disconnected | None = None,
    ) -> Outcome:
        """Run a generation to completion; raises a SameseedError with the reason otherwise."""
        try:
            outcome = await self._run(request, received_at or utc_now(), disconnected)
        except SameseedError as exc:
            self.metrics.jobs.labels(outcome=exc.type).inc()
            raise
        self.metrics.jobs.labels(outcome="ok").inc()
        return outcome

    async def _run(self, request: GenerationRequest, received: str, disconnected: Disconnected | None) -> Outcome:
        effective = resolve_request(self.registry, self.default_model, request)
        group = self._group_for_key(effective.model, request.reproducibility_key)
        self._admit()
        job = Job(
            id=f"gen_{uuid.uuid4().hex}",
            request=effective,
            received_at=received,
            future=asyncio.get_running_loop().create_future(),
            group_key=group,
        )
        self._jobs[job.id] = job
        self._idle.clear()
        self._pending.extend((job, k) for k in range(effective.num_images))
        log.info(
            "job admitted", extra={"generation_id": job.id, "model": effective.model, "images": effective.num_images}
        )
        self._pump()
        try:
            await self._wait(job, disconnected)
        finally:
            self._forget(job)  # a cancelled or abandoned request frees its place
        job.future.result()  # raises the job's error
        self.metrics.end_to_end.observe(time.monotonic() - job.admitted)
        return self._outcome(job)

    async def _wait(self, job: Job, disconnected: Disconnected | None) -> None:
        deadline = job.admitted + self.job_timeout_s
        while not job.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = "started" if job.started_at else "never started"
                self._fail(job, JobTimeout(f"{job.id} passed its deadline of {self.job_timeout_s:g}s ({state})"))
                return
            step = remaining if disconnected is None else min(remaining, DISCONNECT_POLL_S)
            with contextlib.suppress(TimeoutError, SameseedError):
                await asyncio.wait_for(asyncio.shield(job.future), step)
            if not job.done and disconnected is not None and await disconnected():
                self._fail(job, ClientDisconnected(f"the client of {job.id} disconnected; its images were dropped"))

    def _group_for_key(self, model: str, key: str | None) -> str | None:
        if key is None:
            return None
        groups = {w.group_key for w in self.workers() if w.models.get(model, {}).get("reproducibility_key") == key}
        if not groups:
            available = sorted(
                {w.models[model]["reproducibility_key"] for w in self.workers() if model in w.models}
            )
            raise KeyUnavailable(
                f"no worker serves model {model} with reproducibility key {key}; "
                f"available: {', '.join(available) or 'none loaded yet'}",
                param="reproducibility_key",
            )
        return groups.pop()

    def _admit(self) -> None:
        if self.draining:
            raise NotReady("the server is draining for shutdown and accepts no new work")
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
        serving = max(1, sum(1 for w in self.workers() if w.state in SERVING))
        return (len(self._pending) + serving) * self._image_seconds / serving

    # ------------------------------------------------------------------ routing
    def _pump(self) -> None:
        """Give each idle worker, least busy first, the oldest image it may run (its job's group only)."""
        if self.pool is not None:
            self._pending = deque(t for t in self._pending if not t[0].done)
            idle = [w for w in self.workers() if w.state in (WorkerState.READY, WorkerState.QUARANTINED)]
            for worker in sorted(idle, key=lambda w: (self._busy_s.get(w.id, 0.0), w.id)):
                run = self._golden_for(worker)
                if run is not None:  # golden images go before jobs: the check judges the worker first
                    self._dispatch_golden(worker, run)
                    continue
                if worker.state is not WorkerState.READY:
                    continue
                task = next((t for t in self._pending if t[0].group_key in (None, worker.group_key)), None)
                if task is not None:
                    self._pending.remove(task)
                    self._dispatch(worker, *task)
        self._sync_metrics()

    def _dispatch(self, worker: WorkerHandle, job: Job, index: int) -> None:
        request = job.request
        job.group_key = job.group_key or worker.group_key
        if job.started_at is None:
            job.started_at = utc_now()
            self.metrics.queue_wait.observe(time.monotonic() - job.admitted)
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
            self._apply_quarantine()  # a peer that is gone for good no longer vouches for its group
        elif isinstance(event, WorkerReady):
            self.start_check(worker)
        self._fail_stranded_jobs()
        self._pump()

    def _fail_stranded_jobs(self) -> None:
        """Fail jobs whose group (or the whole pool) has no worker serving or coming back."""
        alive = [w for w in self.workers() if w.state in SERVING or w.state in COMING]
        for job in list(self._jobs.values()):
            group = [w for w in alive if job.group_key in (None, w.group_key)]
            if not group:
                members = [w for w in self.workers() if job.group_key in (None, w.group_key)]
                reasons = "; ".join(f"{w.id}: {w.last_error}" for w in members) or "no worker of its group"
                self._fail(job, NotReady(f"no worker can serve {job.id} ({reasons})"))

    def _release(self, worker: WorkerHandle) -> tuple[Any, int] | None:
        current, worker.current = worker.current, None
        if worker.state is WorkerState.BUSY:
            worker.state = WorkerState.QUARANTINED if worker.id in self._quarantined else WorkerState.READY
        if current is None:
            return None
        job, index, started = current
        elapsed = time.monotonic() - started
        self._busy_s[worker.id] = self._busy_s.get(worker.id, 0.0) + elapsed
        self.metrics.worker_busy.labels(worker=worker.id).inc(elapsed)
        self._image_seconds = 0.8 * self._image_seconds + 0.2 * elapsed
        return job, index

    def _on_image(self, worker: WorkerHandle, event: ImageRendered) -> None:
        self._release(worker)
        if event.model_loaded:
            worker.models[event.model_loaded["model"]] = event.model_loaded
        if event.job_id in self._checks:
            self._on_golden(self._checks[event.job_id], event.index, event, None)
            return
        worker.jobs_done += 1
        self.metrics.worker_jobs.labels(worker=worker.id).inc()
        model = event.model.get("id", "?")
        self.metrics.generation.labels(model=model).observe(event.seconds)
        self.metrics.images.labels(model=model).inc()
        upcasts = self.metrics.vae_upcasts.labels(model=model)  # exported at 0: increase() sees the first upcast
        if getattr(event, "vae_upcast", False):
            upcasts.inc()
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
        if event.job_id in self._checks:
            self._on_golden(self._checks[event.job_id], event.index, None, f"{event.error_type}: {event.message}")
            return
        job = self._jobs.get(event.job_id)
        if job is not None:
            self._fail(job, error_from_type(event.error_type, event.message, event.param))

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        for run in [r for r in self._checks.values() if r.worker_id == worker.id]:
            self._end_check(run, None)  # a fresh check runs when the worker is ready again
        current = self._release(worker)
        if current is None:
            return
        job, index = current
        if isinstance(job, GoldenRun) or job.done:
            return
        if job.attempts.get(index, 0) < MAX_ATTEMPTS:
            log.warning(
                "worker %s died mid-image; retrying image %d", worker.id, index, extra={"generation_id": job.id}
            )
            self.metrics.retries.inc()
            self._pending.appendleft((job, index))
        else:
            self._fail(job, WorkerLost(f"the worker died twice while generating image {index} of {job.id}"))

    # ------------------------------------------------------------------ golden checks
    def start_check(self, worker: WorkerHandle) -> asyncio.Future[WorkerConsistency | None] | None:
        """Queue a golden-suite run on this worker (ahead of jobs); None when checks are off or moot."""
        if self.consistency is None or worker.state not in (*SERVING, WorkerState.QUARANTINED):
            return None
        running = next((r for r in self._checks.values() if r.worker_id == worker.id), None)
        if running is not None:
            return self._check_done[running.id]
        run = self.consistency.plan(f"golden_{uuid.uuid4().hex}", worker.id, list(worker.models))
        if not run.items:
            return None
        self._checks[run.id] = run
        future: asyncio.Future[WorkerConsistency | None] = asyncio.get_running_loop().create_future()
        self._check_done[run.id] = future
        log.info("golden check queued on %s (%d images)", worker.id, len(run.items))
        self._pump()
        return future

    async def run_checks(self, timeout_s: float) -> None:
        """Run the golden suite on every serving or quarantined worker now and wait for the verdicts."""
        futures = [f for w in self.workers() if (f := self.start_check(w)) is not None]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)

    def start_periodic_checks(self) -> None:
        """Every SAMESEED_CONSISTENCY_INTERVAL_S, queue a golden run on each worker (0 turns it off)."""
        if self.consistency is None or self.consistency.interval_s <= 0 or self._periodic is not None:
            return

        async def every() -> None:
            assert self.consistency is not None
            while True:
                await asyncio.sleep(self.consistency.interval_s)
                for worker in self.workers():
                    self.start_check(worker)

        self._periodic = asyncio.get_running_loop().create_task(every())

    def _golden_for(self, worker: WorkerHandle) -> GoldenRun | None:
        return next(
            (r for r in self._checks.values() if r.worker_id == worker.id and r.sent < len(r.messages)), None
        )

    def _dispatch_golden(self, worker: WorkerHandle, run: GoldenRun) -> None:
        message = run.messages[run.sent]
        run.sent += 1
        worker.state, worker.current = WorkerState.BUSY, (run, message.index, time.monotonic())
        assert self.pool is not None
        if not self.pool.send(worker, message):
            worker.current = None

    def _on_golden(self, run: GoldenRun, index: int, result: ImageRendered | None, error: str | None) -> None:
        if result is not None:
            run.results[index] = result
        else:
            run.errors[index] = error or "failed"
        if run.complete:
            assert self.consistency is not None
            record = self.consistency.record(run, utc_now())
            self._end_check(run, record)
            self._apply_quarantine()

    def _end_check(self, run: GoldenRun, record: WorkerConsistency | None) -> None:
        self._checks.pop(run.id, None)
        future = self._check_done.pop(run.id, None)
        if future is not None and not future.done():
            future.set_result(record)

    def _apply_quarantine(self) -> None:
        """Quarantine exactly the drifted workers that have a consistent, serving peer in their group."""
        if self.consistency is None:
            return
        states = {w.id: self.consistency.worker(w.id).state for w in self.workers()}
        healthy_groups = {  # a consistent peer that is restarting still counts: it serves again soon
            w.group_key for w in self.workers()
            if states[w.id] in ("consistent", "baseline_recorded") and w.state in (*SERVING, *COMING)
        }
        for worker in self.workers():
            should = (
                self.consistency.quarantine_on_drift
                and states[worker.id] == "drifted"
                and worker.group_key in healthy_groups
            )
            if should and worker.id not in self._quarantined:
                self._quarantined.add(worker.id)
                log.warning("worker %s quarantined: drifted while a peer of its group is consistent", worker.id)
                if worker.state is WorkerState.READY:
                    worker.state = WorkerState.QUARANTINED
            elif not should and worker.id in self._quarantined:
                self._quarantined.discard(worker.id)
                log.info("worker %s back in rotation", worker.id)
                if worker.state is WorkerState.QUARANTINED:
                    worker.state = WorkerState.READY

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
        if not self._jobs:
            self._idle.set()
        self._sync_metrics()

    def refresh_metrics(self) -> None:
        """Bring gauges (queue depth, worker states, restarts) up to date."""
        self._sync_metrics()

    def _sync_metrics(self) -> None:
        self.metrics.queue_depth.set(self.waiting_jobs())
        self.metrics.images_pending.set(len(self._pending))
        self.metrics.set_worker_keys(
            {w.id: {m: info.get("reproducibility_key") for m, info in w.models.items()} for w in self.workers()}
        )
        for worker in self.workers():
            self.metrics.set_worker_state(worker.id, worker.state.value)
            seen = self._restarts_seen.get(worker.id, 0)
            if worker.restarts > seen:
                self.metrics.worker_restarts.labels(worker=worker.id).inc(worker.restarts - seen)
                self._restarts_seen[worker.id] = worker.restarts

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
                    "vae_upcast": image.vae_upcast,
                }
                for image in images
            ],
            warnings=warnings,
            conditioning=first.conditioning,
            received=job.received_at,
            started=job.started_at or job.received_at,
            finished=job.finished_at or utc_now(),
        )
        log.info(
            "job done", extra={"generation_id": job.id, "reproducibility_key": manifest.runtime.reproducibility_key}
        )
        return Outcome(id=job.id, images=images, manifest=manifest)
