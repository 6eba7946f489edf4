"""The dispatcher: one queue for all work (user jobs and golden checks), routed image by image to workers.

One image is one unit of execution. A work item's images all run inside one group of workers that
share a runtime fingerprint, so an n-image request is bitwise equal to n single requests. The
dispatcher admits user work into a bounded queue, orders images by priority then arrival, routes
each to the least busy idle worker its item may use, retries an image whose worker died, enforces
deadlines and client disconnects, and drains on shutdown. Worker state belongs to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable

from app.errors import (
    ClientDisconnected,
    JobTimeout,
    KeyUnavailable,
    NotReady,
    QueueFull,
    SameseedError,
    WorkerLost,
    error_from_type,
)
from app.scheduler.work import Priority, Progress, Work, WorkState
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import epoch_ns, from_carrier, tracer
from app.timestamps import utc_now
from app.worker.messages import ImageCanceled, ImageFailed, ImageRendered, ImageStep, RenderBatch, RenderImage
from app.worker.pool import COMING, SERVING, InFlight, WorkerEvent, WorkerExited, WorkerHandle, WorkerPool, WorkerState

log = logging.getLogger("app.scheduler")

Disconnected = Callable[[], Awaitable[bool]]
WorkerListener = Callable[[WorkerHandle, WorkerEvent], None]
DISCONNECT_POLL_S = 0.25
Task = tuple[int, int, Work, int]  # (priority, arrival, work, image index): one queued image


class Dispatcher:
    """Bounded admission, one priority queue, routing within a key group, retries, deadlines and drain."""

    def __init__(
        self, *, pool: WorkerPool, max_queue: int, job_timeout_s: float, metrics: Metrics | None = None,
        max_batch: int = 1, batch_wait_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.max_batch = max_batch  # images per co-batched call (1: every image alone)
        self.batch_wait_s = batch_wait_s  # the longest a user image waits for company before running alone
        self._wake: asyncio.TimerHandle | None = None
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.metrics = metrics or Metrics()
        self.metrics.queue_limit.set(max_queue)
        self.draining = False
        self._works: dict[str, Work] = {}
        self._pending: list[tuple[int, int, Work, int]] = []  # (priority, arrival, work, image index), sorted
        self._arrivals = itertools.count()
        self._image_seconds = 1.0  # running estimate for Retry-After
        self._restarts_seen: dict[str, int] = {}
        self._listeners: list[WorkerListener] = []
        self._idle = asyncio.Event()
        self._idle.set()
        pool.attach(self.on_event)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the pool's workers (from the running event loop)."""
        self.pool.start()
        self._sync_metrics()

    def subscribe(self, listener: WorkerListener) -> None:
        """Call `listener(worker, event)` after every worker lifecycle event (ready, failed, exited)."""
        self._listeners.append(listener)

    def begin_drain(self) -> None:
        """Refuse new user work (503) and report not ready; admitted jobs keep running."""
        if not self.draining:
            self.draining = True
            log.info("draining: %d jobs in flight", self.user_jobs())

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for admitted user jobs to finish; fail the rest. Returns how many failed."""
        self.begin_drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        left = [w for w in self._works.values() if w.priority is Priority.USER]
        for work in left:
            self.fail(work, NotReady(f"the server shut down before {work.id} finished (drain {grace_s:g}s)"))
        return len(left)

    async def close(self, stop_timeout_s: float = 10.0) -> None:
        """Stop accepting, fail what is left, stop the workers (killing those not gone within the timeout)."""
        self.draining = True
        for work in list(self._works.values()):
            self.fail(work, NotReady("the server is shutting down"))
        await self.pool.stop(stop_timeout_s)
        self._sync_metrics()

    # ------------------------------------------------------------------ status
    def workers(self) -> list[WorkerHandle]:
        """All worker handles, in id order."""
        return self.pool.handles()

    def ready(self) -> bool:
        """True when not draining and at least one worker has its pipeline loaded and takes user work."""
        # a held or quarantined worker may be busy, but only with its golden check
        return not self.draining and any(
            w.state in SERVING and not w.held and not w.quarantined for w in self.workers()
        )

    def user_jobs(self) -> int:
        """User jobs admitted and not finished."""
        return sum(1 for w in self._works.values() if w.priority is Priority.USER)

    def waiting_jobs(self) -> int:
        """User jobs admitted but not yet started."""
        return sum(1 for w in self._works.values() if w.priority is Priority.USER and w.started_at is None)

    def in_flight(self, priority: Priority) -> list[Work]:
        """Work items of one priority that are queued or running."""
        return [w for w in self._works.values() if w.priority is priority]

    def group_for_key(self, model: str, key: str | None) -> str | None:
        """The worker group serving `model` under reproducibility key `key` (None: any); 409 when none does."""
        if key is None:
            return None
        groups = {w.group_key for w in self.workers() if w.models.get(model, {}).get("reproducibility_key") == key}
        if not groups:
            available = sorted({w.models[model]["reproducibility_key"] for w in self.workers() if model in w.models})
            raise KeyUnavailable(
                f"no worker serves model {model} with reproducibility key {key}; "
                f"available: {', '.join(available) or 'none loaded yet'}",
                param="reproducibility_key",
            )
        return groups.pop()

    # ------------------------------------------------------------------ work
    def submit(self, work: Work) -> Work:
        """Queue a work item; user work passes admission first (draining 503, no worker 503, queue full 429)."""
        if work.priority is Priority.USER:
            self._admit()
            self._idle.clear()
        self._works[work.id] = work
        for index in range(len(work.images)):
            self._enqueue(work, index)
        log.info("work admitted", extra={"generation_id": work.id, "images": len(work.images)})
        self._pump()
        return work

    async def run(self, work: Work, *, disconnected: Disconnected | None = None) -> Work:
        """Submit a user work item and wait for it within the job deadline; raises its error otherwise."""
        self.submit(work)
        return await self.wait(work, disconnected=disconnected)

    async def wait(self, work: Work, *, disconnected: Disconnected | None = None) -> Work:
        """Wait for a submitted item within the job deadline (leaving early cancels it); raises its error."""
        try:
            await self._wait(work, disconnected)
        finally:
            if not work.finished:  # a cancelled or abandoned request frees its place
                self.fail(work, ClientDisconnected(f"the caller of {work.id} went away"), state=WorkState.CANCELED)
        if work.error is not None:
            raise work.error
        self.metrics.end_to_end.observe(time.monotonic() - work.admitted)
        return work

    async def _wait(self, work: Work, disconnected: Disconnected | None) -> None:
        deadline = work.admitted + self.job_timeout_s
        while not work.finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = "started" if work.started_at else "never started"
                self.fail(work, JobTimeout(f"{work.id} passed its deadline of {self.job_timeout_s:g}s ({state})"))
                return
            step = remaining if disconnected is None else min(remaining, DISCONNECT_POLL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(work.done.wait(), step)
            if not work.finished and disconnected is not None and await disconnected():
                self.fail(work, ClientDisconnected(f"the client of {work.id} disconnected; its images were dropped"))

    def fail(self, work: Work, error: SameseedError, *, state: WorkState = WorkState.FAILED) -> None:
        """End a work item with an error (a no-op once it has ended); its queued images are dropped."""
        if work.finished:
            return
        work.error = error
        if state is WorkState.FAILED:
            log.warning("work failed: %s", error.message, extra={"generation_id": work.id, "error_type": error.type})
        self._finish(work, state)

    def cancel(self, work: Work, error: SameseedError) -> None:
        """Cancel a work item: its queued images are dropped at once, running ones stop at their next step."""
        self.fail(work, error, state=WorkState.CANCELED)

    def queue_position(self, work: Work) -> int | None:
        """1 for the next item to start, 2 for the one after, ...; None once it started or ended."""
        if work.started_at is not None or work.finished:
            return None
        ahead: list[Work] = []
        for _, _, queued, _ in self._pending:
            if queued is work:
                return len(ahead) + 1
            if queued.started_at is None and queued not in ahead:
                ahead.append(queued)
        return None

    def _finish(self, work: Work, state: WorkState) -> None:
        work.state, work.finished_at = state, utc_now()
        self._works.pop(work.id, None)
        self._pending = [t for t in self._pending if t[2] is not work]
        if state is not WorkState.SUCCEEDED:  # its images still rendering are of no use: stop them
            for worker in self.workers():
                if worker.in_flight is not None and worker.in_flight.holds(work.id):
                    self.pool.cancel(worker.id, work.id)
        if not any(w.priority is Priority.USER for w in self._works.values()):
            self._idle.set()
        work.done.set()
        if work.on_done is not None:
            work.on_done(work)
        self._sync_metrics()

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

    def _enqueue(self, work: Work, index: int, *, first: bool = False) -> None:
        arrival = -1 if first else next(self._arrivals)  # a retried image goes before its priority's queue
        self._pending.append((int(work.priority), arrival, work, index))
        self._pending.sort(key=lambda t: (t[0], t[1]))

    # ------------------------------------------------------------------ routing
    @staticmethod
    def _may_run(worker: WorkerHandle, work: Work) -> bool:
        if work.worker_id is not None:
            return work.worker_id == worker.id
        return worker.state is WorkerState.READY and work.group_key in (None, worker.group_key)

    def _pump(self) -> None:
        """Give each idle worker, least busy first, the first queued image it may run, with the compatible
        images queued behind it when the worker proved co-batching for their shape."""
        for worker in self.pool.idle():
            task = next((t for t in self._pending if self._may_run(worker, t[2])), None)
            if task is None:
                continue
            tasks = self._batch_for(worker, task)
            if not tasks:
                continue  # waiting (at most batch_wait_s since admission) for company
            for chosen in tasks:
                self._pending.remove(chosen)
            if len(tasks) == 1:
                self._dispatch(worker, task[2], task[3])
            else:
                self._dispatch_batch(worker, tasks)
        self._sync_metrics()

    def _batch_for(self, worker: WorkerHandle, head: Task) -> list[Task]:
        """The queued images to send `worker` with `head` (head first); [] to wait a little for more.

        Only images that share a pipeline call (`GenerationParams.cobatch_key`), the priority and the
        workers they may run on go together, and only in a batch size this worker proved bitwise for
        their (model, shape, guidance mode); anything else runs alone. Idle workers split the queued
        images between them.
        """
        work, index = head[2], head[3]
        params = work.images[index]
        guided = params.guidance_scale > 1.0  # proofs hold per guidance mode (one or two UNet rows per image)
        proven = worker.batch_sizes(params.model, params.width, params.height, guided)
        sizes = [s for s in proven if s <= self.max_batch]
        if not sizes or not work.cobatchable(index):
            return [head]
        key = params.cobatch_key()
        mates = [
            t for t in self._pending
            if t is not head and t[0] == head[0] and t[2].worker_id == work.worker_id and t[2].cobatchable(t[3])
            and self._may_run(worker, t[2]) and t[2].images[t[3]].cobatch_key() == key
        ][: sizes[-1] - 1]
        waited = time.monotonic() - work.admitted
        # company is worth waiting for only while other work runs (a burst): on an idle server a lone image
        # starts at once; a re-run already waited once
        busy = any(w.state is WorkerState.BUSY for w in self.workers())
        patient = work.priority is Priority.USER and busy and not work.attempts.get(index)
        if len(mates) + 1 < sizes[-1] and patient and waited < self.batch_wait_s:
            self._wake_in(self.batch_wait_s - waited)
            return []
        # idle workers that may take this work share the queued images: 4 images and 2 idle workers make
        # two calls of 2 (both workers busy) rather than one call of 4 and an idle worker
        peers = max(1, sum(1 for w in self.pool.idle() if self._may_run(w, work)))
        share = -(-(len(mates) + 1) // peers)
        size = max((s for s in sizes if s <= share), default=1)
        return [head, *mates[: size - 1]]

    def _wake_in(self, delay_s: float) -> None:
        """Pump again after `delay_s` (once: an earlier wake-up already pending covers a later one)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        if self._wake is not None and not self._wake.cancelled() and self._wake.when() <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_at(when, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    def _dispatch_batch(self, worker: WorkerHandle, tasks: list[Task]) -> None:
        """Send compatible images to one worker as one co-batched call."""
        starting: dict[str, int] = {}  # work id -> its first image here, for works that start with this call
        for t in tasks:
            if t[2].started_at is None:
                starting.setdefault(t[2].id, t[3])
        messages = tuple(self._message(worker, t[2], t[3]) for t in tasks)
        if not self.pool.assign_batch(worker.id, RenderBatch(messages)):
            for t in tasks:  # the exit event follows and restarts the worker (re-queued first, in order)
                self._enqueue(t[2], t[3], first=True)
            return
        for t in tasks:
            if starting.get(t[2].id) == t[3]:
                self._progress(t[2], Progress.STARTED, {"worker": worker.id, "index": t[3]})

    def _message(self, worker: WorkerHandle, work: Work, index: int) -> RenderImage:
        """Mark image `index` of `work` as sent to `worker` (starting the work) and build its message."""
        work.group_key = work.group_key or worker.group_key
        if work.started_at is None:
            work.started_at, work.state = utc_now(), WorkState.RUNNING
            if work.priority is Priority.USER:
                self.metrics.queue_wait.observe(time.monotonic() - work.admitted)
                if work.trace_context:  # noted now that it is over: admission to the first image sent
                    tracer().start_span(
                        "queue wait", context=from_carrier(work.trace_context), start_time=epoch_ns(work.admitted)
                    ).end()
        work.attempts[index] = work.attempts.get(index, 0) + 1
        return RenderImage(
            work.id, index, work.images[index], check=work.priority is Priority.CHECK,
            trace_context=work.trace_context or None, previews=work.previews,
        )

    def _dispatch(self, worker: WorkerHandle, work: Work, index: int) -> None:
        started = work.started_at is None
        message = self._message(worker, work, index)
        if not self.pool.assign(worker.id, message):
            self._enqueue(work, index, first=True)  # the exit event follows and restarts the worker
        elif started:
            self._progress(work, Progress.STARTED, {"worker": worker.id, "index": index})

    @staticmethod
    def _progress(work: Work, kind: Progress, data: dict) -> None:
        if work.on_progress is not None:
            work.on_progress(work, kind, data)

    # ------------------------------------------------------------------ events
    def on_event(self, worker: WorkerHandle, event: WorkerEvent, finished: InFlight | None) -> None:
        """Handle one worker event from the pool (on the event loop thread), with the image it ended."""
        if finished is not None:
            elapsed = time.monotonic() - finished.started
            self.metrics.worker_busy.labels(worker=worker.id).inc(elapsed)
            per_image = elapsed / len(finished.images)  # a co-batched call made several
            self._image_seconds = 0.8 * self._image_seconds + 0.2 * per_image
        if isinstance(event, ImageStep):
            self._on_step(event)
            return  # nothing changed hands: no routing to redo
        if isinstance(event, ImageRendered):
            self._on_image(worker, event)
        elif isinstance(event, ImageFailed):
            self._on_image_failed(event)
        elif isinstance(event, ImageCanceled):
            self._on_image_canceled(event)
        else:
            if isinstance(event, WorkerExited):
                self._on_worker_exit(worker, finished)
            for listener in self._listeners:
                listener(worker, event)
        self._fail_stranded()
        self._pump()

    def _on_image(self, worker: WorkerHandle, event: ImageRendered) -> None:
        work = self._works.get(event.job_id)
        if work is None:
            return  # its item already ended (failed, timed out, cancelled)
        if work.priority is Priority.USER:
            model = event.model.get("id", "?")
            self.metrics.worker_jobs.labels(worker=worker.id).inc()
            self.metrics.generation.labels(model=model).observe(event.seconds)
            self.metrics.images.labels(model=model).inc()
            upcasts = self.metrics.vae_upcasts.labels(model=model)  # exported at 0: increase() sees the first upcast
            if event.image.vae_upcast:
                upcasts.inc()
            cobatched = self.metrics.cobatched.labels(model=model)
            if event.image.cobatched_with:
                cobatched.inc()
        work.results[event.image.index] = event
        index = event.image.index
        work.steps_done[index] = max(work.steps_done.get(index, 0), work.images[index].steps)
        self._progress(work, Progress.IMAGE, {**event.image.hash_fields(), "worker": worker.id})
        if work.complete:
            self._complete(work)

    def _on_image_canceled(self, event: ImageCanceled) -> None:
        """A canceled image whose item still runs shared a co-batched call with a canceled job: run it again."""
        work = self._works.get(event.job_id)
        if work is None or work.finished:
            return  # its item already ended; the worker is idle again and takes the next image
        work.steps_done[event.index] = 0
        self._enqueue(work, event.index, first=True)

    def _on_step(self, event: ImageStep) -> None:
        work = self._works.get(event.job_id)
        if work is None:
            return
        work.steps_done[event.index] = event.step
        data = {"index": event.index, "worker": event.worker_id, "step": event.step, "steps": event.steps}
        if event.preview_png is not None:
            data["preview_png"] = event.preview_png
        self._progress(work, Progress.STEP, data)

    def _on_image_failed(self, event: ImageFailed) -> None:
        work = self._works.get(event.job_id)
        if work is None:
            return
        error = error_from_type(event.error_type, event.message, event.param)
        if work.all_or_nothing:
            self.fail(work, error)
            return
        work.errors[event.index] = error
        if work.complete:
            self._complete(work)

    def _complete(self, work: Work) -> None:
        if work.all_or_nothing:
            keys = {r.runtime["reproducibility_key"] for r in work.results.values()}
            if len(keys) != 1:  # cannot happen inside one group; refuse rather than mix keys
                self.fail(work, WorkerLost(f"images of {work.id} came from different reproducibility keys"))
                return
        self._finish(work, WorkState.SUCCEEDED)

    def _on_worker_exit(self, worker: WorkerHandle, finished: InFlight | None) -> None:
        for work in [w for w in self._works.values() if w.worker_id == worker.id]:
            self.fail(work, WorkerLost(f"worker {worker.id} exited during {work.id}"))
        if finished is None:
            return
        for message in finished.images:  # every image of a co-batched call the worker had not answered (in order)
            work = self._works.get(message.job_id)
            if work is None or work.finished or message.index in work.results or message.index in work.errors:
                continue
            index = message.index
            if work.attempts.get(index, 0) <= work.retries:
                log.warning(
                    "worker %s died mid-image; retrying image %d", worker.id, index, extra={"generation_id": work.id}
                )
                self.metrics.retries.inc()
                self._enqueue(work, index, first=True)
            else:
                self.fail(work, WorkerLost(f"the worker died twice while generating image {index} of {work.id}"))

    def _fail_stranded(self) -> None:
        """Fail work whose group (or the whole pool) has no worker serving or coming back."""
        # a worker held for its golden check serves once it passes
        alive = [w for w in self.workers() if w.state in (*SERVING, *COMING, WorkerState.CHECKING)]
        for work in list(self._works.values()):
            if work.worker_id is not None:
                continue  # pinned work ends with its worker's exit
            if not any(work.group_key in (None, w.group_key) for w in alive):
                members = [w for w in self.workers() if work.group_key in (None, w.group_key)]
                reasons = "; ".join(f"{w.id}: {w.last_error}" for w in members) or "no worker of its group"
                self.fail(work, NotReady(f"no worker can serve {work.id} ({reasons})"))

    # ------------------------------------------------------------------ metrics
    def refresh_metrics(self) -> None:
        """Bring gauges (queue depth, worker states, restarts, loaded keys) up to date: called at each scrape."""
        self._sync_metrics()
        # which key each worker serves is only read by a scrape: derived here, not after every event
        self.metrics.set_worker_keys(
            {w.id: {m: info.get("reproducibility_key") for m, info in w.models.items()} for w in self.workers()}
        )
        self.metrics.set_cobatch_proofs({w.id: [dict(v) for v in w.cobatch] for w in self.workers()})

    def _sync_metrics(self) -> None:
        self.metrics.queue_depth.set(self.waiting_jobs())
        self.metrics.images_pending.set(len(self._pending))
        for worker in self.workers():
            self.metrics.set_worker_state(worker.id, worker.state.value)
            seen = self._restarts_seen.get(worker.id, 0)
            if worker.restarts > seen:
                self.metrics.worker_restarts.labels(worker=worker.id).inc(worker.restarts - seen)
                self._restarts_seen[worker.id] = worker.restarts
