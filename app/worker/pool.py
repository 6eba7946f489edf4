"""The worker pool (server side): sole owner of every worker's state and in-flight image; spawns, watches, restarts.

Other layers read a `WorkerHandle` and ask the pool to act (`assign`, `set_quarantined`, `stop`);
only this module changes a handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.worker.messages import (
    FromWorker,
    ImageCanceled,
    ImageFailed,
    ImageRendered,
    RenderBatch,
    RenderImage,
    ToWorker,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)

log = logging.getLogger("app.pool")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_RAPID_CRASHES = 5
STABLE_AFTER_S = 60.0


class WorkerState(enum.StrEnum):
    """Lifecycle of one worker process."""

    STARTING = "starting"
    CHECKING = "checking"  # loaded, held out of user work until its start-up golden check passes
    READY = "ready"
    BUSY = "busy"
    RESTARTING = "restarting"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerExited:
    """The worker process ended (crash, kill, or after a start failure)."""

    worker_id: str
    exitcode: int | None


@dataclass(frozen=True)
class InFlight:
    """The image a worker is rendering (or the images of its co-batched call): the message, and when (monotonic)."""

    message: RenderImage  # the first image of a co-batched call
    started: float
    batch: tuple[RenderImage, ...] = ()  # every image of a co-batched call, `message` first

    @property
    def images(self) -> tuple[RenderImage, ...]:
        """Every image this call renders (one, unless co-batched)."""
        return self.batch or (self.message,)

    def holds(self, job_id: str) -> bool:
        """Whether an image of job `job_id` is in this call."""
        return any(m.job_id == job_id for m in self.images)


@dataclass
class WorkerHandle:
    """Server-side view of one worker process; changed by the pool only."""

    config: WorkerConfig
    state: WorkerState = WorkerState.STARTING
    process: Any = None
    conn: Any = None
    pid: int | None = None
    jobs_done: int = 0
    last_error: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    group_key: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: int = 0
    crashes_in_row: int = 0
    started_at: float = 0.0
    ready_seconds: float | None = None
    in_flight: InFlight | None = None
    quarantined: bool = False  # kept out of user work (drifted while a peer of its group is consistent)
    held: bool = False  # kept out of user work until its golden check passes (SAMESEED_READY_REQUIRES_CONSISTENCY)
    busy_s: float = 0.0  # seconds spent rendering, for least-busy routing
    start_timed_out: bool = False
    cancel: Any = None  # a multiprocessing.Event the worker checks between steps of the image in flight
    cobatch: tuple[dict[str, Any], ...] = ()  # the worker's co-batching proof per (model, width, height, size)
    awaiting: set[tuple[str, int]] = field(default_factory=set)  # (job, index) of a co-batched call not answered yet

    def batch_sizes(self, model: str, width: int, height: int, guided: bool) -> tuple[int, ...]:
        """The batch sizes this worker proved bitwise for a (model, shape, guidance mode), ascending; () when none."""
        wanted = (model, width, height, guided)
        return tuple(sorted(
            v["size"] for v in self.cobatch
            if v.get("proven") and (v.get("model"), v.get("width"), v.get("height"), v.get("guided")) == wanted
        ))

    @property
    def id(self) -> str:
        """The worker id."""
        return self.config.worker_id

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for /readyz."""
        return {
            "id": self.id,
            "device": self.config.device,
            "state": self.state.value,
            "pid": self.pid,
            "jobs_done": self.jobs_done,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "torch_threads": self.runtime.get("torch_threads"),
            "cpu_capability": self.runtime.get("cpu_capability"),
            "group_key": self.group_key,
            "models": {m: info.get("reproducibility_key") for m, info in self.models.items()},
            "ready_seconds": self.ready_seconds,
            "cobatch": [dict(v) for v in self.cobatch],
        }


WorkerEvent = FromWorker | WorkerExited
EventSink = Callable[[WorkerHandle, WorkerEvent, InFlight | None], None]
SERVING = (WorkerState.READY, WorkerState.BUSY)
COMING = (WorkerState.STARTING, WorkerState.RESTARTING)
IDLE = (WorkerState.READY, WorkerState.QUARANTINED, WorkerState.CHECKING)


class WorkerPool:
    """Owns the worker processes and their state; hands every event, with the image it ended, to `sink`.

    A worker that is still `starting` after `start_timeout_s` is killed and restarted (with the
    crash backoff), its `last_error` saying why.
    """

    def __init__(
        self, configs: list[WorkerConfig], sink: EventSink | None = None, *, start_timeout_s: float = 300.0
    ) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.workers = {c.worker_id: WorkerHandle(config=c) for c in configs}
        self._sink = sink
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.start_timeout_s = start_timeout_s

    def launch(self) -> WorkerPool:
        """Spawn every worker process now, before there is an event loop (their torch import then
        overlaps the server's own start-up); `start` later watches them."""
        for handle in self.workers.values():
            if handle.process is None:
                self._launch(handle)
        return self

    def attach(self, sink: EventSink) -> WorkerPool:
        """Deliver events to `sink` (the dispatcher); returns the pool."""
        self._sink = sink
        return self

    def start(self) -> None:
        """Spawn the workers not launched yet and watch every one; call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        for handle in self.workers.values():
            if handle.process is None:
                self._launch(handle)
            self._watch(handle)

    def terminate(self) -> None:
        """Kill every worker at once (start-up failed before the server ran)."""
        for handle in self.workers.values():
            if handle.process is not None and handle.process.is_alive():
                handle.process.kill()
                handle.process.join(timeout=5)

    # ------------------------------------------------------------------ what others may read or ask
    def handles(self) -> list[WorkerHandle]:
        """Every worker handle, in id order (read-only for callers)."""
        return sorted(self.workers.values(), key=lambda w: w.id)

    def idle(self) -> list[WorkerHandle]:
        """Workers that can take an image now (quarantined ones take only work pinned to them), least busy first."""
        return sorted((w for w in self.workers.values() if w.state in IDLE), key=lambda w: (w.busy_s, w.id))

    def assign(self, worker_id: str, message: RenderImage) -> bool:
        """Send one image to an idle worker, which becomes busy with it; False when it cannot be delivered."""
        handle = self.workers[worker_id]
        if handle.state not in IDLE:
            raise RuntimeError(f"worker {worker_id} is {handle.state.value}, not idle")
        handle.state, handle.in_flight = WorkerState.BUSY, InFlight(message, time.monotonic())
        if self._transmit(handle, message):
            return True
        handle.in_flight = None  # stays busy: the exit event follows and restarts it
        return False

    def assign_batch(self, worker_id: str, batch: RenderBatch) -> bool:
        """Send compatible images to an idle worker as one co-batched call; it is busy until each is answered."""
        handle = self.workers[worker_id]
        if handle.state not in IDLE:
            raise RuntimeError(f"worker {worker_id} is {handle.state.value}, not idle")
        handle.state = WorkerState.BUSY
        handle.in_flight = InFlight(batch.images[0], time.monotonic(), batch.images)
        handle.awaiting = {(m.job_id, m.index) for m in batch.images}
        if self._transmit(handle, batch):
            return True
        handle.in_flight, handle.awaiting = None, set()  # stays busy: the exit event follows and restarts it
        return False

    def cancel(self, worker_id: str, job_id: str) -> bool:
        """Stop the image a worker renders at its next step, if it belongs to `job_id`; True when signalled.

        The worker answers ImageCanceled (and is then idle again) or, if it was past its last step,
        its image as usual.
        """
        handle = self.workers[worker_id]
        if handle.in_flight is None or not handle.in_flight.holds(job_id):
            return False
        self._signal_cancel(handle)
        return True

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        if handle.cancel is not None:
            handle.cancel.set()

    def set_quarantined(self, worker_id: str, quarantined: bool) -> None:
        """Keep a worker out of user work (or bring it back); a busy worker changes when its image ends."""
        handle = self.workers[worker_id]
        handle.quarantined = quarantined
        if handle.state in IDLE:
            handle.state = self._resting(handle)

    def set_held(self, worker_id: str, held: bool) -> None:
        """Hold a worker out of user work until its golden check passes (or release it); pinned work still runs."""
        handle = self.workers[worker_id]
        handle.held = held
        if handle.state in IDLE:
            handle.state = self._resting(handle)

    @staticmethod
    def _resting(handle: WorkerHandle) -> WorkerState:
        """The state of a loaded worker with no image: which work it may take."""
        if handle.quarantined:
            return WorkerState.QUARANTINED
        return WorkerState.CHECKING if handle.held else WorkerState.READY

    def _release(self, handle: WorkerHandle) -> InFlight | None:
        finished, handle.in_flight, handle.awaiting = handle.in_flight, None, set()
        if handle.state is WorkerState.BUSY:
            handle.state = self._resting(handle)
        if finished is not None:
            handle.busy_s += time.monotonic() - finished.started
        return finished

    # ------------------------------------------------------------------ processes
    def _spawn(self, handle: WorkerHandle) -> None:
        self._launch(handle)
        self._watch(handle)

    def _launch(self, handle: WorkerHandle) -> None:
        from app.worker.process import run_worker

        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # a shared flag, not a pipe message: the worker's main thread is inside the pipeline, and
        # reads it between steps without a reader thread of its own
        handle.cancel = self._ctx.Event()
        process = self._ctx.Process(
            target=run_worker,
            args=(handle.config, child_conn, handle.cancel),
            name=f"sameseed-{handle.id}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so the parent sees EOF the moment the child dies
        handle.process, handle.conn, handle.pid = process, parent_conn, process.pid
        self._starting(handle)
        log.info("worker %s starting (pid %s, device %s)", handle.id, process.pid, handle.config.device)

    def _starting(self, handle: WorkerHandle) -> None:
        handle.state, handle.started_at, handle.start_timed_out = WorkerState.STARTING, time.monotonic(), False
        handle.runtime, handle.models, handle.group_key, handle.in_flight = {}, {}, None, None
        handle.cobatch, handle.awaiting = (), set()

    def _watch(self, handle: WorkerHandle) -> None:
        threading.Thread(target=self._read, args=(handle, handle.conn, handle.process), daemon=True).start()
        self._arm_start_timeout(handle)

    def _arm_start_timeout(self, handle: WorkerHandle) -> None:
        assert self._loop is not None
        left = max(0.0, handle.started_at + self.start_timeout_s - time.monotonic())
        self._loop.call_later(left, self._check_started, handle, handle.process)

    def _check_started(self, handle: WorkerHandle, process: Any) -> None:
        if process is not handle.process or handle.state is not WorkerState.STARTING or self._closing:
            return
        handle.start_timed_out = True
        log.error("worker %s did not become ready within %gs; killing it", handle.id, self.start_timeout_s)
        self._kill(handle)

    def _kill(self, handle: WorkerHandle) -> None:
        """Kill the worker process now; its reader thread then reports the exit."""
        if handle.process is not None and handle.process.is_alive():
            handle.process.kill()

    def _read(self, handle: WorkerHandle, conn: Any, process: Any) -> None:
        """Reader thread: forward every message; on EOF, wait for the exit code and report it."""
        assert self._loop is not None
        while True:
            try:
                message = conn.recv()
                self._loop.call_soon_threadsafe(self._deliver, handle, process, message)
            except (EOFError, OSError, RuntimeError):  # the pipe closed, or the event loop did
                break
        process.join(timeout=5)
        with contextlib.suppress(RuntimeError):  # the event loop already closed: nobody is listening
            self._loop.call_soon_threadsafe(self._deliver, handle, process, WorkerExited(handle.id, process.exitcode))

    def _deliver(self, handle: WorkerHandle, process: Any, event: WorkerEvent) -> None:
        if process is not handle.process:
            return  # from an earlier incarnation
        finished: InFlight | None = None
        if isinstance(event, ImageRendered | ImageFailed | ImageCanceled):
            check = handle.in_flight is not None and handle.in_flight.message.check
            index = event.image.index if isinstance(event, ImageRendered) else event.index
            handle.awaiting.discard((event.job_id, index))
            # a co-batched call ends with its last image's answer; until then the worker stays busy with it
            finished = self._release(handle) if not handle.awaiting else None
            if isinstance(event, ImageRendered):
                handle.jobs_done += 0 if check else 1
                if event.model_loaded:
                    handle.models[event.model_loaded["model"]] = event.model_loaded
        elif isinstance(event, WorkerReady):
            handle.state = self._resting(handle)
            handle.runtime, handle.group_key = event.runtime, event.group_key
            handle.models, handle.pid = dict(event.models), event.pid
            handle.cobatch = tuple(event.cobatch)
            handle.ready_seconds = round(time.monotonic() - handle.started_at, 3)
            log.info("worker %s ready in %.2fs (group %s)", handle.id, handle.ready_seconds, event.group_key)
        elif isinstance(event, WorkerFailed):
            handle.state, handle.last_error = WorkerState.FAILED, f"{event.error_type}: {event.message}"
            log.error("worker %s failed to start: %s", handle.id, handle.last_error)
        elif isinstance(event, WorkerExited):
            finished = self._release(handle)
            self._on_exit(handle, event)
        if self._sink is not None:
            self._sink(handle, event, finished)

    def _on_exit(self, handle: WorkerHandle, event: WorkerExited) -> None:
        if handle.conn is not None:
            handle.conn.close()
        if self._closing or handle.state is WorkerState.STOPPED:
            handle.state = WorkerState.STOPPED
            return
        if handle.state is WorkerState.FAILED and handle.runtime == {}:
            return  # a start failure is deterministic (bad model, bad device): do not loop on it
        uptime = time.monotonic() - handle.started_at
        handle.crashes_in_row = 1 if uptime > STABLE_AFTER_S else handle.crashes_in_row + 1
        if handle.start_timed_out:
            handle.last_error = (
                f"did not become ready within {self.start_timeout_s:g}s (SAMESEED_WORKER_START_TIMEOUT_S)"
            )
        else:
            handle.last_error = f"worker process exited with code {event.exitcode}"
        log.error("worker %s died (%s)", handle.id, handle.last_error)
        if handle.crashes_in_row > MAX_RAPID_CRASHES:
            handle.state = WorkerState.FAILED
            handle.last_error += f"; gave up after {MAX_RAPID_CRASHES} rapid restarts"
            return
        handle.state = WorkerState.RESTARTING
        delay = RESTART_BACKOFF_S[min(handle.crashes_in_row, len(RESTART_BACKOFF_S)) - 1]
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, handle)

    def _restart(self, handle: WorkerHandle) -> None:
        if self._closing or handle.state is not WorkerState.RESTARTING:
            return
        handle.restarts += 1
        self._spawn(handle)

    def _transmit(self, handle: WorkerHandle, message: ToWorker) -> bool:
        """Send a message down a worker's pipe; False when the pipe is already broken."""
        try:
            handle.conn.send(message)
            return True
        except (OSError, ValueError, BrokenPipeError):
            return False

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every worker to exit, wait up to `timeout_s`, then kill what is left."""
        from app.worker.messages import Shutdown

        self._closing = True
        for handle in self.workers.values():
            if handle.process is not None and handle.process.is_alive():
                self._transmit(handle, Shutdown())
        deadline = time.monotonic() + timeout_s
        for handle in self.workers.values():
            process = handle.process
            if process is None:
                continue
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            handle.state = WorkerState.STOPPED
