"""A worker pool whose workers are Ray Serve replicas on any node of a Ray cluster (`serve --ray ADDRESS`).

The dispatcher is unchanged: it still picks the worker of every image (its key group, least busy,
golden checks pinned to one worker) and this pool, like `WorkerPool`, owns each worker's state and
in-flight image. So Serve must deliver an image to the replica the dispatcher chose, not one of its
own choosing. Three ways were weighed:

- one deployment with N replicas and Serve's router: it picks replicas itself (power of two
  choices), so key groups, golden checks per replica and quarantine could not be honoured;
- a custom `RequestRouter` reading a target replica from each request: alpha in Ray 2.60, and it
  only ranks replicas Serve already chose to consider;
- **one single-replica deployment per worker slot** (application `sameseed-w0`, `sameseed-w1`, ...):
  a handle to a slot is a handle to exactly one replica, through Serve's stable API. Serve places
  each slot where its resources are (`num_gpus=1`, or CPUs), and replaces a replica that dies; the
  slot keeps its id, so the dispatcher, metrics and golden checks see one worker restarting, as with
  a process. This is the choice.

Each replica reports its runtime fingerprint, so replicas on different hardware land in different
key groups exactly as worker processes do; `runtime.worker_id` names the node and the replica
(`10.0.0.7/w1#k3j2x9`). A slot's events travel as the worker's own messages: a render is a
streaming call yielding `ImageStep`s and then `ImageRendered` / `ImageFailed` / `ImageCanceled`. A
replica that dies mid-image ends its stream with an error: the pool reports `WorkerExited`, the
dispatcher retries the image once on its group, and the slot waits for the replica Serve starts
in its place (`WorkerReady` again, then its golden check). Idle replicas are probed every
`probe_s` so a death between images is seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.worker.messages import (
    FromWorker,
    RenderImage,
    ToWorker,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)
from app.worker.pool import EventSink, WorkerExited, WorkerHandle, WorkerPool, WorkerState

log = logging.getLogger("app.pool")

ROOT = Path(__file__).resolve().parents[2]
APP_PREFIX = "sameseed-"
PROBE_S = 2.0
PROBE_TIMEOUT_S = 30.0
REPLICA_ANSWER_S = 5.0  # how long a slot waits for its (new) replica to answer before asking again


class ReplicaBackend(Protocol):
    """How the pool reaches the replica of each slot (Ray Serve; a fake in unit tests)."""

    def deploy(self, configs: list[WorkerConfig]) -> None:
        """Create (or replace) one single-replica deployment per config; returns without waiting for them."""

    async def ready(self, slot: str) -> WorkerReady | WorkerFailed:
        """The slot's replica's start-up answer (waits for its engine); raises when the replica is gone."""

    def render(self, slot: str, message: RenderImage) -> AsyncIterator[FromWorker]:
        """Stream one image's events from the slot's replica; raises when the replica dies mid-image."""

    async def cancel(self, slot: str, job_id: str) -> None:
        """Ask the slot's replica to stop its image at the next step."""

    def delete(self, slots: list[str]) -> None:
        """Remove the slots' deployments (Serve lets their replicas finish what they run, then stops them)."""


@dataclass(eq=False)
class Incarnation:
    """One life of a slot's replica as the pool sees it: events from an earlier one are ignored."""

    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    worker_id: str | None = None  # the replica's runtime.worker_id once ready
    ended: bool = False
    why: str | None = None  # how it ended

    def end(self) -> None:
        """Stop this life's probe and wait tasks (a render in flight ends with its stream)."""
        self.ended = True
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class RayPool(WorkerPool):
    """WorkerPool over Ray Serve replicas: the same states, events and requests; Serve runs and heals replicas."""

    def __init__(
        self,
        configs: list[WorkerConfig],
        backend: ReplicaBackend,
        sink: EventSink | None = None,
        *,
        start_timeout_s: float = 300.0,
        probe_s: float = PROBE_S,
        retry_s: float = 0.5,
    ) -> None:
        super().__init__(configs, sink, start_timeout_s=start_timeout_s)
        self.backend = backend
        self.probe_s = probe_s
        self.retry_s = retry_s  # between asks of a slot whose replica is not answering yet
        self._deployed = False

    # ------------------------------------------------------------------ lifecycle
    def launch(self) -> RayPool:
        """Deploy every slot now (replicas load while the ingress starts); `start` later watches them."""
        self._deploy()
        for handle in self.workers.values():
            if handle.process is None:
                self._launch(handle)
        return self

    def _deploy(self) -> None:
        if not self._deployed:
            self.backend.deploy([h.config for h in self.handles()])
            self._deployed = True

    def terminate(self) -> None:
        """Remove every slot's deployment now (start-up failed before the server ran)."""
        self._closing = True
        self.backend.delete(list(self.workers))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Let images in flight end (up to `timeout_s`), then remove the deployments: Serve drains and stops them."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while any(h.in_flight is not None for h in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in self.workers.values():
            if isinstance(handle.process, Incarnation):
                handle.process.end()
        await asyncio.to_thread(self.backend.delete, list(self.workers))
        for handle in self.workers.values():
            handle.state = WorkerState.STOPPED

    # ------------------------------------------------------------------ one life of a slot
    def _launch(self, handle: WorkerHandle) -> None:
        """A new life of the slot: on the first, the deployment is created; later, Serve has replaced the replica."""
        self._deploy()
        if isinstance(handle.process, Incarnation):
            handle.process.end()
        handle.process, handle.conn, handle.cancel = Incarnation(), None, None
        self._starting(handle)
        log.info("worker %s waiting for its Ray Serve replica (device %s)", handle.id, handle.config.device)

    def _watch(self, handle: WorkerHandle) -> None:
        life = handle.process
        assert isinstance(life, Incarnation)
        self._task(life, self._await_ready(handle, life))
        self._arm_start_timeout(handle)

    def _task(self, life: Incarnation, coro: Any) -> None:  # noqa: ANN401 - a coroutine
        assert self._loop is not None
        task = self._loop.create_task(coro)
        life.tasks.add(task)
        task.add_done_callback(life.tasks.discard)

    def _end(self, handle: WorkerHandle, life: Incarnation, why: str) -> None:
        """This life is over (its replica died, or never answered): report the exit once."""
        if life.ended or life is not handle.process:
            return
        log.warning("worker %s lost its replica %s (%s)", handle.id, life.worker_id, why)
        life.end()
        life.why = why
        self._deliver(handle, life, WorkerExited(handle.id, None))

    def _on_exit(self, handle: WorkerHandle, event: WorkerExited) -> None:
        super()._on_exit(handle, event)
        life = handle.process
        if isinstance(life, Incarnation) and life.why and not handle.start_timed_out and handle.last_error:
            # a replica has no exit code: say what the pool saw instead
            handle.last_error = handle.last_error.replace(
                f"worker process exited with code {event.exitcode}", f"replica {life.worker_id or '?'} lost: {life.why}"
            )

    def _kill(self, handle: WorkerHandle) -> None:
        """No answer within the start timeout: end this life; the restart waits for a replica again."""
        if isinstance(handle.process, Incarnation):
            self._end(handle, handle.process, "no answer")

    async def _await_ready(self, handle: WorkerHandle, life: Incarnation) -> None:
        """Ask the slot until its replica answers (a new one may be starting), then report it and probe it."""
        while not life.ended and not self._closing:
            try:
                async with asyncio.timeout(REPLICA_ANSWER_S):  # not wait_for: in 3.11 it can swallow a cancel
                    answer = await self.backend.ready(handle.id)
            except Exception as exc:  # the replica is gone or not placed yet: Serve is replacing it
                log.debug("worker %s: replica not answering yet (%r)", handle.id, exc)
                await asyncio.sleep(self.retry_s)
                continue
            if isinstance(answer, WorkerReady):
                life.worker_id = answer.worker_id
            self._deliver(handle, life, answer)
            if isinstance(answer, WorkerReady):
                self._task(life, self._probe(handle, life))
            return

    async def _probe(self, handle: WorkerHandle, life: Incarnation) -> None:
        """Every `probe_s`, check that the replica answering the slot is still this life's; end the life if not."""
        while not life.ended and not self._closing:
            await asyncio.sleep(self.probe_s)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    answer = await self.backend.ready(handle.id)
            except TimeoutError:
                continue  # slow (a busy machine) is not dead: the render stream tells a death at once
            except Exception as exc:
                self._end(handle, life, f"probe failed: {exc!r}")
                return
            if getattr(answer, "worker_id", None) != life.worker_id:
                self._end(handle, life, f"replaced by {getattr(answer, 'worker_id', '?')}")
                return

    # ------------------------------------------------------------------ images
    def _transmit(self, handle: WorkerHandle, message: ToWorker) -> bool:
        """Start streaming one image from the slot's replica (events arrive as the process's would)."""
        life = handle.process
        if not isinstance(message, RenderImage) or not isinstance(life, Incarnation) or life.ended:
            return False
        self._task(life, self._stream(handle, life, message))
        return True

    async def _stream(self, handle: WorkerHandle, life: Incarnation, message: RenderImage) -> None:
        assert self._loop is not None
        try:
            async for event in self.backend.render(handle.id, message):
                # handed on like a pipe message: a failure in the server's handling is not the replica's death
                self._loop.call_soon(self._deliver, handle, life, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica died mid-image (or the call was lost): the image is retried
            self._loop.call_soon(self._end, handle, life, f"render of {message.job_id} image {message.index} "
                                 f"failed: {exc!r}")

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        life, flight = handle.process, handle.in_flight
        if isinstance(life, Incarnation) and flight is not None:
            self._task(life, self._cancel(handle.id, flight.message.job_id))

    async def _cancel(self, slot: str, job_id: str) -> None:
        with contextlib.suppress(Exception):  # a replica that is gone has nothing to stop
            await self.backend.cancel(slot, job_id)


# ---------------------------------------------------------------------- Ray Serve


def plan_replicas(workers: str, cluster_gpus: int) -> list[str]:
    """One device per replica from SAMESEED_WORKERS and the cluster's GPUs: `cpu:N`, or one per GPU."""
    if workers.startswith("cpu:"):
        return ["cpu"] * int(workers.split(":", 1)[1])
    if workers == "cuda" and cluster_gpus < 1:
        raise RuntimeError("SAMESEED_WORKERS=cuda but the Ray cluster has no GPU")
    return ["cuda"] * cluster_gpus or ["cpu"]


def connect(address: str) -> int:
    """Join the Ray cluster at `address` as a driver, with Serve's HTTP proxy off; returns the cluster's GPU count.

    Replicas import this checkout's `app` package: the same path on every node (README).
    """
    # a replica busy with torch answers Serve's queue-length probe late; Serve's 0.1 s default only
    # logs warnings and retries (read when ray.serve is first imported)
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace="sameseed",
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            log_to_driver=False,  # replicas log to Ray's session logs, not into the ingress's JSON log lines
        )
    serve.start(proxy_location="Disabled")  # the ingress is our own FastAPI server
    serve_log = logging.getLogger("ray.serve")  # Serve's own lines become our JSON log lines, warnings and up
    serve_log.handlers.clear()
    serve_log.propagate = True
    serve_log.setLevel(logging.WARNING)
    return int(ray.cluster_resources().get("GPU", 0))


class ServeBackend:
    """Slots as Ray Serve applications of one single-replica deployment each (see the module docstring)."""

    def __init__(self, *, graceful_shutdown_s: float = 30.0) -> None:
        self.graceful_shutdown_s = graceful_shutdown_s
        self._handles: dict[str, Any] = {}

    @staticmethod
    def app_name(slot: str) -> str:
        """The Serve application of one slot."""
        return f"{APP_PREFIX}{slot}"

    def deploy(self, configs: list[WorkerConfig]) -> None:
        """Deploy every slot at once and return without waiting for the replicas to load."""
        from ray import serve
        from ray.serve import RunTarget

        from app.worker.ray_replica import SameseedReplica

        targets = []
        for config in configs:
            cuda = config.device.startswith("cuda")
            actor = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": config.cpu_threads}
            deployment = serve.deployment(
                SameseedReplica,
                name="worker",
                num_replicas=1,
                max_ongoing_requests=8,  # a render, its cancel, and liveness probes at once
                ray_actor_options=actor,
                graceful_shutdown_timeout_s=self.graceful_shutdown_s,
            )
            targets.append(RunTarget(target=deployment.bind(config), name=self.app_name(config.worker_id),
                                     route_prefix=None))
        handles = serve.run_many(targets, wait_for_ingress_deployment_creation=False,
                                 wait_for_applications_running=False)
        self._handles = {c.worker_id: h for c, h in zip(configs, handles, strict=True)}

    def _handle(self, slot: str) -> Any:  # noqa: ANN401 - a DeploymentHandle
        return self._handles[slot]

    async def ready(self, slot: str) -> WorkerReady | WorkerFailed:
        """The replica's start-up answer."""
        return await self._handle(slot).ready.remote()

    async def render(self, slot: str, message: RenderImage) -> AsyncIterator[FromWorker]:
        """Stream one image's events."""
        async for event in self._handle(slot).options(stream=True).render.remote(message):
            yield event

    async def cancel(self, slot: str, job_id: str) -> None:
        """Stop the slot's image at its next step."""
        await self._handle(slot).cancel.remote(job_id)

    def delete(self, slots: list[str]) -> None:
        """Delete the slots' applications together and wait until Serve has stopped their replicas."""
        from ray import serve

        names = {self.app_name(slot) for slot in slots}
        with contextlib.suppress(Exception):  # already gone, or the cluster went away
            for name in names:
                serve.delete(name, _blocking=False)
            deadline = time.monotonic() + self.graceful_shutdown_s + 10
            while names & set(serve.status().applications) and time.monotonic() < deadline:
                time.sleep(0.1)
