"""The worker process loop: starts its engine, reports ready or failed, renders one image at a time.

All torch work stays on this process's main thread (DESIGN.md: moving it to another thread
halves the speed on 2 cores).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from app.errors import SameseedError
from app.telemetry.tracing import configure_tracing, from_carrier, shutdown_tracing, tracer
from app.worker.engine import Engine, is_out_of_memory, load_engine, out_of_memory
from app.worker.messages import (
    ImageFailed,
    ImageRendered,
    RenderImage,
    Shutdown,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)

log = logging.getLogger("app.worker")


def _setup_logging(config: WorkerConfig) -> None:
    from app.telemetry.logs import configure_logging

    configure_logging(config.log_level, worker_id=config.worker_id)


def run_worker(config: WorkerConfig, conn: Connection) -> None:
    """Entry point of a spawned worker: start, report ready or failed, then serve until told to stop."""
    from app.pipeline.determinism import prepare_environment

    # The server owns this process's lifecycle (Shutdown message, or kill): a Ctrl-C or SIGTERM
    # sent to the whole process group must not cut an image short while the server drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    prepare_environment(config.device, config.cpu_threads)  # before torch is imported
    _setup_logging(config)
    configure_tracing(**{"sameseed.worker_id": config.worker_id})  # on only when OTEL_* variables say so
    started = time.perf_counter()
    try:
        engine = load_engine(config)
        for model_id in config.preload:
            engine.model(model_id)
    except SameseedError as exc:
        conn.send(WorkerFailed(config.worker_id, exc.type, exc.message))
        return
    except Exception as exc:  # a start-up bug must reach the parent as a reason, not a silent exit
        log.error("worker start failed: %s", traceback.format_exc())
        conn.send(WorkerFailed(config.worker_id, "internal_error", f"worker start failed: {exc!r}"))
        return
    conn.send(
        WorkerReady(
            worker_id=config.worker_id,
            pid=os.getpid(),
            runtime=engine.runtime,
            group_key=_group_key(engine.runtime),
            models=dict(engine.model_keys),
            load_seconds=round(time.perf_counter() - started, 3),
        )
    )
    try:
        serve(engine, conn, config.worker_id)
    finally:
        shutdown_tracing()  # flush this worker's spans


def _group_key(runtime: dict[str, Any]) -> str:
    from app.provenance.key import runtime_group_key

    return runtime_group_key(runtime)


def serve(engine: Engine, conn: Connection, worker_id: str) -> None:
    """Answer RenderImage messages until Shutdown or the parent goes away; job errors are data."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if isinstance(message, Shutdown):
            return
        if not isinstance(message, RenderImage):
            log.error("worker ignored unknown message %r", type(message).__name__)
            continue
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
            reply = _render(engine, message, worker_id)
        conn.send(reply)


def _render(engine: Engine, message: RenderImage, worker_id: str) -> ImageRendered | ImageFailed:
    """Render one image; a job error (out of memory included) becomes an ImageFailed, never an exit."""
    try:
        reply: Any = engine.render(message)
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
    except SameseedError as exc:
        reply = ImageFailed(
            message.job_id, message.index, worker_id, exc.type, exc.message, exc.param
        )
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
