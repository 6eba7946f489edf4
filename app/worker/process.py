"""The worker process: configures torch, loads pipelines once, renders one image at a time.

All torch work stays on this process's main thread (DESIGN.md: moving it to another thread
halves the speed on 2 cores).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from app.errors import SameseedError
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


class Engine:
    """Owns this worker's loaded models (loaded once, kept) and renders images with them."""

    def __init__(self, config: WorkerConfig) -> None:
        from app.pipeline.determinism import configure_torch, runtime_fingerprint
        from app.pipeline.loader import quiet_libraries
        from app.registry import load_registry

        configure_torch(config.device, config.cpu_threads, config.cpu_mkldnn)
        quiet_libraries()
        self.config = config
        self.registry = load_registry(config.registry_path)
        self.runtime = runtime_fingerprint(config.device, config.worker_id, image=config.image)
        self.models: dict[str, Any] = {}
        self.model_keys: dict[str, dict[str, Any]] = {}

    def model(self, model_id: str) -> tuple[Any, dict[str, Any] | None]:
        """The loaded model, loading it now if needed; the second item describes a fresh load."""
        if model_id in self.models:
            return self.models[model_id], None
        from app.errors import ModelNotFound
        from app.pipeline.determinism import torch_device
        from app.pipeline.loader import load_model, resolve_paths
        from app.provenance.key import reproducibility_key

        entry = self.registry.get(model_id)
        if entry is None:
            raise ModelNotFound(f"model {model_id!r} is not in this worker's registry", param="model")
        started = time.perf_counter()
        paths = resolve_paths(entry, self.registry, self.config.data_dir, self.config.allow_download)
        loaded = load_model(entry, paths, torch_device(self.config.device))
        identity = loaded.identity()
        key = reproducibility_key(
            files=identity["files"], pipeline=identity["pipeline"], dtype=identity["dtype"], runtime=self.runtime
        )
        self.models[model_id] = loaded
        self.model_keys[model_id] = {
            "reproducibility_key": key,
            "load_seconds": round(time.perf_counter() - started, 3),
        }
        log.info("loaded model %s from %s in %.2fs", model_id, paths, time.perf_counter() - started)
        return loaded, {"model": model_id, **self.model_keys[model_id]}

    def render(self, job: RenderImage) -> ImageRendered:
        """Render one image of a job and describe it for the manifest."""
        from app.pipeline.generate import ImageParams, render_image
        from app.provenance.key import KEY_RUNTIME_FIELDS

        loaded, fresh = self.model(job.model)
        params = ImageParams(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            seed=job.seed,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            width=job.width,
            height=job.height,
            sampler=job.sampler,
        )
        result = render_image(loaded, params)
        runtime = {
            **{k: v for k, v in self.runtime.items() if k != "pid"},
            "reproducibility_key": self.model_keys[job.model]["reproducibility_key"],
            "key_fields": [
                *KEY_RUNTIME_FIELDS,
                "versions.torch",
                "versions.diffusers",
                "versions.transformers",
                "versions.cuda",
                "versions.cudnn",
            ],
        }
        return ImageRendered(
            job_id=job.job_id,
            index=job.index,
            worker_id=self.config.worker_id,
            seed=job.seed,
            latent_sha256=result.latent_sha256,
            pixel_sha256=result.pixel_sha256,
            png=result.png,
            width=result.image.width,
            height=result.image.height,
            seconds=result.seconds,
            model=loaded.identity(),
            scheduler=result.scheduler,
            runtime=runtime,
            warnings=tuple(result.warnings),
            model_loaded=fresh,
            vae_upcast=result.vae_upcast,
            conditioning=result.conditioning,
            latents=result.latents,
            latent_shape=result.latent_shape,
        )


def _setup_logging(config: WorkerConfig) -> None:
    from app.logs import configure_logging

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
    started = time.perf_counter()
    try:
        from app.worker.prehash import start_prehash

        start_prehash(config)  # model files hash while torch and diffusers import; the pin check waits for them
        engine = Engine(config)
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
    serve(engine, conn)


def _group_key(runtime: dict[str, Any]) -> str:
    from app.provenance.key import runtime_group_key

    return runtime_group_key(runtime)


def serve(engine: Engine, conn: Connection) -> None:
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
        try:
            reply: Any = engine.render(message)
            log.info(
                "image %d rendered in %.3fs",
                message.index,
                reply.seconds,
                extra={"generation_id": message.job_id, "seed": message.seed, "latent_sha256": reply.latent_sha256},
            )
        except SameseedError as exc:
            reply = ImageFailed(
                message.job_id, message.index, engine.config.worker_id, exc.type, exc.message, exc.param
            )
        except Exception as exc:  # recoverable: report it, keep serving
            log.error("generation failed: %s", traceback.format_exc(), extra={"generation_id": message.job_id})
            reply = ImageFailed(
                message.job_id,
                message.index,
                engine.config.worker_id,
                "generation_failed",
                f"the pipeline raised {type(exc).__name__}: {exc}",
            )
        conn.send(reply)
