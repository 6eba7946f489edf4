"""Engines a worker process runs: the diffusers engine, and the interface test fixture engines implement."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from app.errors import OutOfMemory
from app.provenance.manifest import ManifestImage
from app.telemetry.tracing import child_span
from app.timestamps import utc_now
from app.worker.messages import ImageRendered, RenderBatch, RenderImage, WorkerConfig

log = logging.getLogger("app.worker")

StepListener = Callable[..., None]  # (step done, steps[, preview=png of RenderImage.previews]): may raise to stop

KEY_VERSION_FIELDS = (
    "versions.torch", "versions.diffusers", "versions.transformers", "versions.cuda", "versions.cudnn"
)


class Engine(Protocol):
    """What the worker loop needs: a runtime fingerprint, models loaded once, one image at a time."""

    runtime: dict[str, Any]
    model_keys: dict[str, dict[str, Any]]

    def model(self, model_id: str) -> tuple[Any, dict[str, Any] | None]:
        """The loaded model, loading it now if needed; the second item describes a fresh load."""

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Render one image and describe it for the manifest; `on_step(step, steps)` after each step."""


def load_engine(config: WorkerConfig) -> Engine:
    """Build the engine `config.engine` names (`module:Class`), passing it the worker config."""
    module_name, _, class_name = config.engine.partition(":")
    return getattr(importlib.import_module(module_name), class_name)(config)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is the device (CUDA) or host (CPU allocator) running out of memory."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: it cannot be torch's error
    if torch is None:
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def out_of_memory(exc: BaseException, job: RenderImage) -> OutOfMemory:
    """The documented error for an image the device had no memory for (the worker keeps serving)."""
    p = job.params
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return OutOfMemory(
        f"out of memory rendering a {p.width}x{p.height} image of {p.model} ({detail}); try a smaller size",
        param="width",
    )


class DiffusersEngine:
    """Owns this worker's loaded diffusers pipelines (loaded once, kept) and renders images with them."""

    def __init__(self, config: WorkerConfig) -> None:
        from app.models.registry import load_registry
        from app.worker.prehash import refuse_uncached_hub_models, start_prehash

        self.registry = load_registry(config.registry_path)  # read once: the steps before the imports use it too
        refuse_uncached_hub_models(config, self.registry)  # a cold cache it may not fill fails the start at once
        start_prehash(config, self.registry)  # files hash while torch and diffusers import; the pin check waits
        from app.pipeline.determinism import configure_torch, runtime_fingerprint
        from app.pipeline.loader import quiet_libraries

        configure_torch(config.device, config.cpu_threads, config.cpu_mkldnn)
        quiet_libraries()
        self.config = config
        self.runtime = runtime_fingerprint(config.device, config.worker_id, image=config.image)
        self.models: dict[str, Any] = {}
        self.model_keys: dict[str, dict[str, Any]] = {}
        # (model, width, height, guided, batch size) whose co-batched images were proven bitwise their single runs
        self.proven: set[tuple[str, int, int, bool, int]] = set()

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

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Render one image of a job and describe it for the manifest; `on_step(step, steps)` after each step
        (with `preview=` a small PNG when the job asked for previews)."""
        from app.pipeline.generate import render_image

        with child_span("load") if job.params.model not in self.models else contextlib.nullcontext():
            loaded, fresh = self.model(job.params.model)
        result = render_image(loaded, job.params, on_step, previews=job.previews)
        return self._describe(job, loaded, fresh, result)

    def prove_batches(self, model_id: str, sizes: tuple[int, ...], steps: int) -> list[dict[str, Any]]:
        """Prove each batch size at the model's default shape, with its default guidance and without guidance
        (co-batched vs single, every latent and pixel); co-batch only what is proven. One verdict per case."""
        from app.pipeline.batched import prove_batch_sizes
        from app.worker.proofs import ProofStore

        loaded, _ = self.model(model_id)
        key = self.model_keys[model_id]["reproducibility_key"]
        store = ProofStore(self.config.batch_proof_dir)
        verdicts = store.get(key, sizes, steps)
        if verdicts is None:
            proofs = prove_batch_sizes(loaded, sizes, steps=steps, guidance_scales=(None, 0.0))
            proven = [{**proof.describe(), "proven_at": utc_now("seconds")} for proof in proofs]
            store.put(key, sizes, steps, proven)
            verdicts = [{**verdict, "cached": False} for verdict in proven]
        for v in verdicts:
            if v["proven"]:
                self.proven.add((v["model"], v["width"], v["height"], v["guided"], v["size"]))
        return verdicts

    def render_batch(self, batch: RenderBatch, on_step: StepListener | None = None) -> list[ImageRendered]:
        """Render compatible images in one pipeline call when this (model, shape, size) is proven, else one by one;
        each is described as if alone, plus how many others shared its call."""
        from app.pipeline.batched import guided, render_batch

        first = batch.images[0].params
        if (first.model, first.width, first.height, guided(first), len(batch.images)) not in self.proven:
            # never co-batch unproven work (the dispatcher sends none): bits are only promised for what was proven;
            # the batch's listener then reports each image's steps for the whole call, and still stops it on cancel
            return [self.render(job, on_step) for job in batch.images]
        loaded, fresh = self.model(first.model)
        results = render_batch(loaded, [job.params for job in batch.images], on_step)
        return [
            self._describe(job, loaded, fresh if k == 0 else None, result, cobatched_with=len(batch.images) - 1)
            for k, (job, result) in enumerate(zip(batch.images, results, strict=True))
        ]

    def _describe(
        self, job: RenderImage, loaded: Any, fresh: dict[str, Any] | None, result: Any, cobatched_with: int = 0  # noqa: ANN401
    ) -> ImageRendered:
        from app.provenance.key import KEY_RUNTIME_FIELDS

        runtime = {
            **{k: v for k, v in self.runtime.items() if k != "pid"},
            "reproducibility_key": self.model_keys[job.params.model]["reproducibility_key"],
            "key_fields": [*KEY_RUNTIME_FIELDS, *KEY_VERSION_FIELDS],
        }
        return ImageRendered(
            job_id=job.job_id,
            image=ManifestImage(
                index=job.index,
                seed=job.params.seed,
                latent_sha256=result.latent_sha256,
                pixel_sha256=result.pixel_sha256,
                width=result.image.width,
                height=result.image.height,
                worker_id=self.config.worker_id,
                vae_upcast=result.vae_upcast,
                cobatched_with=cobatched_with,
            ),
            png=result.png,
            seconds=result.seconds,
            model=loaded.identity(),
            scheduler=result.scheduler,
            runtime=runtime,
            warnings=tuple(result.warnings),
            model_loaded=fresh,
            conditioning=result.conditioning,
            latents=result.latents,
            latent_shape=result.latent_shape,
        )
