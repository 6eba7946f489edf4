"""Fixture engines for worker processes: a fast fake (no torch), and one engine per failure mode.

A worker runs the engine its config names (`WorkerConfig.engine = "tests.support.engines:Name"`),
so pool tests start real processes, pipes and restarts without loading a pipeline.
"""

from __future__ import annotations

import os
import time
from typing import Any

from app.errors import ModelUnavailable
from app.worker.engine import StepListener
from app.worker.messages import ImageRendered, RenderImage, WorkerConfig
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
