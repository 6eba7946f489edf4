"""One Sameseed worker as a Ray Serve replica: the same engine, determinism setup and worker loop code as a process.

The replica holds one device (`num_gpus=1`, or CPU threads) and one engine. All torch work runs on
one dedicated thread of the replica (DESIGN.md: torch moved between threads is about twice as slow
on small machines), so Serve's event loop stays free to answer `ready` probes and `cancel` calls
while an image renders. Messages are the worker's own (`app.worker.messages`): the ingress's
`RayPool` sends a `RenderImage` and reads the same events a worker process writes to its pipe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from app.worker.messages import FromWorker, RenderImage, WorkerConfig, WorkerFailed, WorkerReady

log = logging.getLogger("app.worker")


def replica_identity(slot: str) -> str:
    """`<node ip>/<slot>#<replica>`: the `runtime.worker_id` of this replica (names the node and the replica)."""
    import ray
    from ray import serve

    node_id = ray.get_runtime_context().get_node_id()
    # the address the node joined the cluster with (`ray start --node-ip-address`), not a guess from routes
    node = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), node_id[:12])
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (a plain Ray actor in tests): the process is the replica
        replica = str(os.getpid())
    return f"{node}/{slot}#{replica}"


class _Outbox:
    """What the worker loop's step listener writes to: a thread-safe hand-off to the replica's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self._loop, self._queue = loop, queue

    def send(self, message: Any) -> None:  # noqa: ANN401 - any worker event
        """Queue one event for the caller's stream (called on the torch thread)."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, message)


class SameseedReplica:
    """A Serve deployment class: loads the engine on its torch thread, then renders one image at a time."""

    def __init__(self, config: WorkerConfig, identity: str | None = None) -> None:
        self._slot = config.worker_id
        self._config = replace(config, worker_id=identity or replica_identity(config.worker_id))
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sameseed-torch")
        self._cancel = threading.Event()
        self._current: RenderImage | None = None  # the image on the torch thread now
        self._current_lock = threading.Lock()  # a late cancel must not stop the next job's image
        self._engine: Any = None
        self._started: Future[WorkerReady | WorkerFailed] = self._torch.submit(self._start)

    def _start(self) -> WorkerReady | WorkerFailed:
        """On the torch thread: the worker process's start-up (environment before torch, engine, preload)."""
        from app.pipeline.determinism import prepare_environment
        from app.worker.process import start_engine

        config = self._config
        prepare_environment(config.device, config.cpu_threads)  # before this process first imports torch
        # a replica renders one image per call: it co-batches nothing, so it proves no batch size
        self._engine, answer = start_engine(config, prove_batches=False, role="replica")
        return answer

    async def ready(self) -> WorkerReady | WorkerFailed:
        """Wait for the engine to load; the same answer every time (the ingress also probes liveness with it)."""
        # shielded: a caller that gives up waiting must not cancel the load itself
        return await asyncio.shield(asyncio.wrap_future(self._started))

    async def cancel(self, job_id: str) -> None:
        """Stop the image in flight at its next step if it belongs to `job_id` (a cancel can arrive late)."""
        with self._current_lock:
            if self._current is not None and self._current.job_id == job_id:
                self._cancel.set()

    async def render(self, message: RenderImage) -> AsyncIterator[FromWorker]:
        """Stream the events of one image: its steps, then ImageRendered, ImageFailed or ImageCanceled."""
        from app.worker.process import _render, _step_listener

        await self.ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        outbox = _Outbox(loop, queue)
        worker_id = self._config.worker_id

        def work() -> Any:  # noqa: ANN401 - the worker loop's reply
            with self._current_lock:
                self._current = message
                self._cancel.clear()
            try:
                listener = _step_listener(outbox, message, worker_id, self._cancel)  # type: ignore[arg-type]
                return _render(self._engine, message, worker_id, listener)
            finally:
                with self._current_lock:
                    self._current = None

        done = loop.run_in_executor(self._torch, work)
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield getter.result()
                continue
            getter.cancel()
            break
        while not queue.empty():  # steps queued just before the image ended
            yield queue.get_nowait()
        yield done.result()
