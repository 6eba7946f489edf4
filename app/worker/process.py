"""The worker process loop: starts its engine, reports ready or failed, renders one image at a time.

All torch work stays on this process's main thread (DESIGN.md: moving it to another thread
halves the speed on 2 cores).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Protocol

from app.errors import SameseedError
from app.telemetry.tracing import configure_tracing, from_carrier, shutdown_tracing, tracer
from app.worker.engine import Engine, is_out_of_memory, load_engine, out_of_memory
from app.worker.messages import (
    ImageCanceled,
    ImageFailed,
    ImageStep,
    RenderBatch,
    RenderImage,
    Shutdown,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)

log = logging.getLogger("app.worker")


class CancelFlag(Protocol):
    """What the loop needs of the parent's cancel signal: a multiprocessing.Event (or a threading.Event in tests)."""

    def is_set(self) -> bool:
        """Whether the parent asked to stop the image in flight."""

    def clear(self) -> None:
        """Forget an old request (before the next image starts)."""


class RenderCanceled(Exception):
    """Raised from the step callback when the parent canceled the image's job: the image stops there."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"canceled after {steps_done} steps")
        self.steps_done = steps_done


def _setup_logging(config: WorkerConfig) -> None:
    from app.telemetry.logs import configure_logging

    configure_logging(config.log_level, worker_id=config.worker_id)


def run_worker(config: WorkerConfig, conn: Connection, cancel: CancelFlag | None = None) -> None:
    """Entry point of a spawned worker: start, report ready or failed, then serve until told to stop."""
    from app.pipeline.determinism import prepare_environment

    # The server owns this process's lifecycle (Shutdown message, or kill): a Ctrl-C or SIGTERM
    # sent to the whole process group must not cut an image short while the server drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    prepare_environment(config.device, config.cpu_threads)  # before torch is imported
    _setup_logging(config)
    configure_tracing(**{"sameseed.worker_id": config.worker_id})  # on only when OTEL_* variables say so
    engine, answer = start_engine(config)
    conn.send(answer)
    if engine is not None:
        try:
            serve(engine, conn, config.worker_id, cancel)
        finally:
            shutdown_tracing()  # flush this worker's spans
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """Leave at once with status 0 once every answer is sent and the logs are flushed.

    Tearing down an interpreter that imported torch, diffusers and transformers takes 1.5-2 s of
    CPU on these machines, and the server's stop waits for it; the worker owns no file, ledger or
    store write that such a teardown would finish (the server process writes them all).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def start_engine(
    config: WorkerConfig, *, prove_batches: bool = True, role: str = "worker"
) -> tuple[Engine | None, WorkerReady | WorkerFailed]:
    """Load the engine, its preloaded models and (when asked) its batch proofs: the engine and its ready
    answer, or None and the reason it could not start (a start-up bug is a reason, not a silent exit)."""
    started = time.perf_counter()
    try:
        engine = load_engine(config)
        for model_id in config.preload:
            engine.model(model_id)
        cobatch = _prove_batches(engine, config) if prove_batches else []
    except SameseedError as exc:
        return None, WorkerFailed(config.worker_id, exc.type, exc.message)
    except Exception as exc:
        log.error("%s start failed: %s", role, traceback.format_exc())
        return None, WorkerFailed(config.worker_id, "internal_error", f"{role} start failed: {exc!r}")
    return engine, WorkerReady(
        worker_id=config.worker_id,
        pid=os.getpid(),
        runtime=engine.runtime,
        group_key=_group_key(engine.runtime),
        models=dict(engine.model_keys),
        load_seconds=round(time.perf_counter() - started, 3),
        cobatch=tuple(cobatch),
    )


def _prove_batches(engine: Engine, config: WorkerConfig) -> list[dict[str, Any]]:
    """Prove every configured batch size on each preloaded model before serving; what fails runs singly."""
    if not config.batch_sizes:
        return []
    prove = getattr(engine, "prove_batches", None)
    if prove is None:  # an engine that cannot co-batch says so, in /readyz and the metrics
        return [
            {"model": model_id, "width": None, "height": None, "guided": None, "size": size, "proven": False,
             "reason": f"engine {type(engine).__name__} has no co-batched path", "seconds": 0.0}
            for model_id in config.preload for size in config.batch_sizes if size >= 2
        ]
    verdicts: list[dict[str, Any]] = []
    for model_id in config.preload:
        verdicts.extend(prove(model_id, config.batch_sizes, config.batch_proof_steps))
    for verdict in verdicts:
        if verdict["proven"]:
            log.info("co-batching proven: %s %sx%s guided=%s batch %d (%s)", verdict["model"], verdict["width"],
                     verdict["height"], verdict["guided"], verdict["size"],
                     f"kept from {verdict['proven_at']}" if verdict.get("cached") else f"{verdict['seconds']:.2f}s")
        else:
            log.warning("co-batching off: %s batch %d: %s", verdict["model"], verdict["size"], verdict["reason"])
    return verdicts


def _group_key(runtime: dict[str, Any]) -> str:
    from app.provenance.key import runtime_group_key

    return runtime_group_key(runtime)


def _step_listener(conn: Connection, message: RenderImage, worker_id: str, cancel: CancelFlag | None) -> Any:  # noqa: ANN401
    """Report each finished step (and its preview, if asked) to the parent; stop the image once the cancel flag is set.

    Runs inside the pipeline on this main thread: torch work never moves to another thread.
    """

    def on_step(step: int, steps: int, preview: bytes | None = None) -> None:
        if cancel is not None and cancel.is_set():
            raise RenderCanceled(step)
        preview = preview if message.previews else None  # off unless the job asked: nothing extra on the pipe
        conn.send(ImageStep(message.job_id, message.index, worker_id, step, steps, preview))

    return on_step


def serve(engine: Engine, conn: Connection, worker_id: str, cancel: CancelFlag | None = None) -> None:
    """Answer RenderImage messages until Shutdown or the parent goes away; job errors are data.

    `cancel` is set by the parent to stop the image being rendered at the next step boundary;
    the loop clears it before each image (the parent only sets it for the image in flight).
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if isinstance(message, Shutdown):
            return
        if isinstance(message, RenderBatch):
            if cancel is not None:
                cancel.clear()
            for reply in _render_batch(engine, message, worker_id, _batch_listener(conn, message, worker_id, cancel)):
                conn.send(reply)
            continue
        if not isinstance(message, RenderImage):
            log.error("worker ignored unknown message %r", type(message).__name__)
            continue
        if cancel is not None:
            cancel.clear()
        span = (
            tracer().start_as_current_span(
                "render image",
                context=from_carrier(message.trace_context),
                attributes={"sameseed.worker_id": worker_id, "sameseed.index": message.index},
            )
            if message.trace_context
            else contextlib.nullcontext()
        )
        with span:
            reply = _render(engine, message, worker_id, _step_listener(conn, message, worker_id, cancel))
        conn.send(reply)


def _batch_listener(conn: Connection, batch: RenderBatch, worker_id: str, cancel: CancelFlag | None) -> Any:  # noqa: ANN401
    """Report each finished step of a co-batched call as a step of every image in it; stop them all on cancel."""

    def on_step(step: int, steps: int, preview: bytes | None = None) -> None:
        if cancel is not None and cancel.is_set():
            raise RenderCanceled(step)
        for job in batch.images:
            conn.send(ImageStep(job.job_id, job.index, worker_id, step, steps))

    return on_step


def _render_batch(engine: Engine, batch: RenderBatch, worker_id: str, on_step: Any) -> list[Any]:  # noqa: ANN401
    """Render a batch; every image gets its own reply. A cancel stops them all (the parent re-queues the images
    of jobs still wanted); an error fails each image of the call with it, and the worker keeps serving."""
    first = batch.images[0]
    try:
        with (
            tracer().start_as_current_span(
                "render batch", context=from_carrier(first.trace_context),
                attributes={"sameseed.worker_id": worker_id, "sameseed.batch_size": len(batch.images)},
            )
            if first.trace_context
            else contextlib.nullcontext()
        ):
            replies: list[Any] = engine.render_batch(batch, on_step)  # type: ignore[attr-defined]
        log.info("batch of %d rendered", len(replies),
                 extra={"generation_id": first.job_id, "seeds": [j.params.seed for j in batch.images]})
        return replies
    except RenderCanceled as exc:
        log.info("batch of %d canceled after %d steps", len(batch.images), exc.steps_done,
                 extra={"generation_id": first.job_id})
        return [ImageCanceled(j.job_id, j.index, worker_id, exc.steps_done) for j in batch.images]
    except SameseedError as exc:
        return [ImageFailed(j.job_id, j.index, worker_id, exc.type, exc.message, exc.param) for j in batch.images]
    except Exception as exc:  # recoverable: report it for every image, keep serving
        if is_out_of_memory(exc):
            error = out_of_memory(exc, first)
            return [ImageFailed(j.job_id, j.index, worker_id, error.type, error.message, error.param)
                    for j in batch.images]
        log.error("batch generation failed: %s", traceback.format_exc(), extra={"generation_id": first.job_id})
        return [
            ImageFailed(j.job_id, j.index, worker_id, "generation_failed",
                        f"the pipeline raised {type(exc).__name__}: {exc}")
            for j in batch.images
        ]


def _render(engine: Engine, message: RenderImage, worker_id: str, on_step: Any) -> Any:  # noqa: ANN401
    """Render one image; a job error (out of memory included) or a cancel becomes a reply, never an exit."""
    try:
        reply: Any = engine.render(message, on_step)
        log.info(
            "image %d rendered in %.3fs",
            message.index,
            reply.seconds,
            extra={
                "generation_id": message.job_id,
                "seed": message.params.seed,
                "latent_sha256": reply.image.latent_sha256,
            },
        )
    except RenderCanceled as exc:
        log.info("image %d canceled after %d steps", message.index, exc.steps_done,
                 extra={"generation_id": message.job_id})
        reply = ImageCanceled(message.job_id, message.index, worker_id, exc.steps_done)
    except SameseedError as exc:
        reply = ImageFailed(message.job_id, message.index, worker_id, exc.type, exc.message, exc.param)
    except Exception as exc:  # recoverable: report it, keep serving
        if is_out_of_memory(exc):
            error = out_of_memory(exc, message)
            log.error("out of memory: %s", error.message, extra={"generation_id": message.job_id})
            return ImageFailed(message.job_id, message.index, worker_id, error.type, error.message, error.param)
        log.error("generation failed: %s", traceback.format_exc(), extra={"generation_id": message.job_id})
        reply = ImageFailed(
            message.job_id,
            message.index,
            worker_id,
            "generation_failed",
            f"the pipeline raised {type(exc).__name__}: {exc}",
        )
    return reply
