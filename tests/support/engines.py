"""Fixture engines for worker processes: a fast fake (no torch), and one engine per failure mode.

A worker runs the engine its config names (`WorkerConfig.engine = "tests.support.engines:Name"`),
so pool tests start real processes, pipes and restarts without loading a pipeline.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

from app.errors import ModelUnavailable
from app.worker.engine import StepListener
from app.worker.messages import ImageRendered, RenderBatch, RenderImage, WorkerConfig
from tests.support.fakes import FAKE_KEY, RUNTIME, fake_preview, rendered


class FakeEngine:
    """Renders plausible images whose hashes depend only on the parameters, in milliseconds."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.runtime = {**RUNTIME, "worker_id": config.worker_id, "pid": os.getpid()}
        self.model_keys: dict[str, dict[str, Any]] = {}

    def model(self, model_id: str) -> tuple[Any, dict[str, Any] | None]:
        """Load (pretend) a model once."""
        if model_id in self.model_keys:
            return model_id, None
        self.model_keys[model_id] = {"reproducibility_key": FAKE_KEY, "load_seconds": 0.0}
        return model_id, {"model": model_id, **self.model_keys[model_id]}

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """A fake image of `job`."""
        self.model(job.params.model)
        return rendered(job, self.config.worker_id)


class SteppingEngine(FakeEngine):
    """Reports every one of `params.steps` steps, each taking a few milliseconds, like a real pipeline."""

    STEP_S = 0.005

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Step through the image (the listener may raise to stop it), then render."""
        for step in range(1, job.params.steps + 1):
            time.sleep(self.STEP_S)  # stands for a denoising step's work
            if on_step is not None and job.previews:  # as DiffusersEngine: a preview only when the job asked
                on_step(step, job.params.steps, preview=fake_preview(job, step))
            elif on_step is not None:
                on_step(step, job.params.steps)
        return super().render(job)


class RaisingEngine(FakeEngine):
    """The pipeline raises for every image whose prompt is "raise" (a job error; the worker keeps serving)."""

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Raise on "raise", else render."""
        if job.params.prompt == "raise":
            raise ValueError("the pipeline broke")
        return super().render(job, on_step)


class ExitingEngine(FakeEngine):
    """The process dies mid-image whenever the prompt is "exit" (as a CUDA fault or the OOM killer would)."""

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Exit on "exit", else render."""
        if job.params.prompt == "exit":
            os._exit(3)
        return super().render(job, on_step)


class HangingEngine(FakeEngine):
    """The pipeline never returns for the prompt "hang"."""

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """Hang on "hang", else render."""
        while job.params.prompt == "hang":
            time.sleep(3600)
        return super().render(job, on_step)


class OutOfMemoryEngine(FakeEngine):
    """The device runs out of memory for images wider than 64 pixels."""

    def render(self, job: RenderImage, on_step: StepListener | None = None) -> ImageRendered:
        """MemoryError above 64 px wide, else render."""
        if job.params.width > 64:
            raise MemoryError("cannot allocate 4.00 GiB")
        return super().render(job, on_step)


class LoadsForeverEngine(FakeEngine):
    """Loading never finishes (a stuck download or a hung driver)."""

    def model(self, model_id: str) -> tuple[Any, dict[str, Any] | None]:
        """Never return."""
        while True:
            time.sleep(3600)


class UnloadableEngine(FakeEngine):
    """The model cannot be loaded (a pinned hash mismatch): a start failure, not a crash."""

    def model(self, model_id: str) -> tuple[Any, dict[str, Any] | None]:
        """Refuse the model."""
        raise ModelUnavailable(f"{model_id}: sha256 mismatch in unet/diffusion_pytorch_model.safetensors")


class CobatchingEngine(FakeEngine):
    """Co-batches like the diffusers engine: the real start-up proof over fake renders, then co-batched calls of
    exactly the proven (model, shape, guidance mode, size); a batch's images are bitwise their single runs."""

    DEFAULTS = SimpleNamespace(width=64, height=64, steps=20, guidance_scale=7.5, sampler="pndm")

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.proven: set[tuple[Any, ...]] = set()

    def batch_salt(self, size: int, k: int) -> str:
        """What a batch-dependent kernel would change in image k of a batch of `size` (nothing here)."""
        return ""

    def prove_batches(self, model_id: str, sizes: tuple[int, ...], steps: int) -> list[dict[str, Any]]:
        """The real proof (`prove_batch_sizes`) with this engine's single and batched renders."""
        from app.pipeline.batched import prove_batch_sizes

        model = SimpleNamespace(entry=SimpleNamespace(id=model_id, defaults=self.DEFAULTS))
        proofs = prove_batch_sizes(
            model, sizes, steps=steps, guidance_scales=(None, 0.0),
            render_one=lambda m, p: rendered(RenderImage("proof", 0, p)).image,
            render_many=lambda m, ps: [
                rendered(RenderImage("proof", k, p), salt=self.batch_salt(len(ps), k)).image for k, p in enumerate(ps)
            ],
        )
        self.proven = {(v.model, v.width, v.height, v.guided, v.size) for v in proofs if v.proven}
        return [v.describe() for v in proofs]

    def render_batch(self, batch: RenderBatch, on_step: StepListener | None = None) -> list[ImageRendered]:
        """One call for a proven batch (each image says how many shared it), else one image at a time."""
        p, n = batch.images[0].params, len(batch.images)
        if (p.model, p.width, p.height, p.guidance_scale > 1, n) not in self.proven:
            return [self.render(job, on_step) for job in batch.images]
        for job in batch.images:
            self.model(job.params.model)
        if on_step is not None:  # one step for the whole call (the listener may raise to stop every image)
            on_step(1, 1)
        return [
            rendered(job, self.config.worker_id, salt=self.batch_salt(n, k), cobatched_with=n - 1)
            for k, job in enumerate(batch.images)
        ]


class BatchDependentEngine(CobatchingEngine):
    """A machine whose kernels change bits with the batch size: image 1 of any batch differs from its single run."""

    def batch_salt(self, size: int, k: int) -> str:
        """Image 1 of every batch gets other bits."""
        return f"batch of {size}" if k == 1 else ""
