"""A worker pool you can drive by hand (the real state keeping, no processes, no torch), and fake images."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import numpy
from PIL import Image

from app.provenance.manifest import ManifestImage
from app.worker.messages import (
    ImageCanceled,
    ImageFailed,
    ImageRendered,
    ImageStep,
    RenderBatch,
    RenderImage,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)
from app.worker.pool import MAX_RAPID_CRASHES, WorkerExited, WorkerHandle, WorkerPool, WorkerState

RUNTIME = {
    "device_kind": "cpu",
    "device_name": "Fake CPU",
    "cpu_capability": "AVX2",
    "cuda_capability": None,
    "torch_threads": 1,
    "mkldnn": True,
    "deterministic_algorithms": True,
    "cudnn_deterministic": True,
    "cudnn_benchmark": False,
    "tf32_matmul": False,
    "tf32_cudnn": False,
    "cublas_workspace_config": ":4096:8",
    "attention_backend": "sdpa-cpu",
    "noise_device": "cpu",
    "versions": {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.23.0"},
}


FAKE_KEY = "rk1-" + "f" * 64


def fake_hash(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def fake_png(width: int, height: int, *parts: Any) -> tuple[bytes, str]:
    """A real PNG whose pixels depend only on `parts`, and its pixel_sha256 (DESIGN.md definition)."""
    rng = numpy.random.default_rng(int(fake_hash(*parts)[:16], 16))
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue(), hashlib.sha256(pixels.tobytes()).hexdigest()


def fake_preview(message: RenderImage, step: int) -> bytes:
    """The step preview a worker would send: a latent-sized (width/8 x height/8) PNG."""
    params = message.params
    return fake_png(params.width // 8, params.height // 8, "preview", message.job_id, message.index, step)[0]


def rendered(
    message: RenderImage, worker_id: str = "w0", key: str = FAKE_KEY, salt: str = "", cobatched_with: int = 0
) -> ImageRendered:
    """A plausible ImageRendered whose hashes depend only on the parameters (like the real thing)."""
    p = message.params
    params = (p.model, p.prompt, p.negative_prompt, p.seed, p.steps, p.guidance_scale, p.width, p.height, p.sampler)
    png, pixel_hash = fake_png(p.width, p.height, "pixel", *params)
    return ImageRendered(
        job_id=message.job_id,
        image=ManifestImage(
            index=message.index,
            seed=p.seed,
            latent_sha256=fake_hash("latent", salt, *params),
            pixel_sha256=pixel_hash,
            width=p.width,
            height=p.height,
            worker_id=worker_id,
            cobatched_with=cobatched_with,
        ),
        png=png,
        seconds=0.01,
        model={
            "id": p.model,
            "family": "sd1",
            "source_kind": "local",
            "source": "/models/x",
            "pipeline": "StableDiffusionPipeline",
            "dtype": "float32",
            "files": {"unet/x.safetensors": "ab" * 32},
            "scheduler_config": {"num_train_timesteps": 1000},
        },
        scheduler={"class_name": "PNDMScheduler", "config": {"num_train_timesteps": 1000}},
        runtime={**RUNTIME, "worker_id": worker_id, "reproducibility_key": key, "key_fields": ["device_kind"]},
    )


class FakePool(WorkerPool):
    """The real pool's state keeping with no processes: the test decides when workers get ready, answer or die.

    Every state change goes through the real pool's own event handling (`_deliver`), so what a
    test sees is what the pool would do; only spawning and the pipe are replaced.
    """

    def __init__(
        self, configs: list[WorkerConfig], *, auto: bool = False, start_timeout_s: float = 300.0, auto_steps: int = 0
    ) -> None:
        super().__init__(configs, start_timeout_s=start_timeout_s)
        self.auto = auto
        self.auto_steps = auto_steps  # with auto: report this many steps before answering
        self.sent: list[tuple[str, Any]] = []
        self.cancels: list[str] = []  # workers whose cancel flag was set
        self.killed: list[str] = []
        self.stopped = False

    # ---------------------------------------------------------------- process stand-ins
    def _launch(self, handle: WorkerHandle) -> None:
        handle.process, handle.conn, handle.pid = object(), None, None  # a fresh incarnation
        self._starting(handle)

    def _watch(self, handle: WorkerHandle) -> None:
        self._arm_start_timeout(handle)
        if self.auto:
            asyncio.get_running_loop().call_soon(self.ready, handle.id)

    def _kill(self, handle: WorkerHandle) -> None:
        self.killed.append(handle.id)
        asyncio.get_running_loop().call_soon(self._deliver, handle, handle.process, WorkerExited(handle.id, -9))

    def _transmit(self, handle: WorkerHandle, message: Any) -> bool:
        self.sent.append((handle.id, message))
        if self.auto and isinstance(message, RenderImage):
            loop = asyncio.get_running_loop()
            for step in range(1, self.auto_steps + 1):
                loop.call_soon(self.step, handle.id, message, step, self.auto_steps)
            loop.call_soon(self.answer, handle.id, message)
        if self.auto and isinstance(message, RenderBatch):
            loop = asyncio.get_running_loop()
            for image in message.images:
                loop.call_soon(self.answer, handle.id, image, "", len(message.images) - 1)
        return True

    def _signal_cancel(self, handle: WorkerHandle) -> None:
        self.cancels.append(handle.id)

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._closing = True
        self.stopped = True
        for handle in self.workers.values():
            handle.state = WorkerState.STOPPED

    # ---------------------------------------------------------------- what the test drives
    def ready(
        self, worker_id: str, group_key: str = "g1", models: dict[str, Any] | None = None,
        cobatch: tuple[dict[str, Any], ...] = (),
    ) -> None:
        """The worker reports ready with these loaded models (none by default: no golden check plans) and
        co-batching proofs (none by default: every image alone)."""
        handle = self.workers[worker_id]
        if handle.process is None:
            self._launch(handle)
        event = WorkerReady(worker_id, 1000, dict(RUNTIME), group_key, dict(models or {}), 0.1, tuple(cobatch))
        self._deliver(handle, handle.process, event)

    def answer(self, worker_id: str, message: RenderImage, salt: str = "", cobatched_with: int = 0) -> None:
        """The worker finishes `message` with a plausible image (one of a co-batched call: `cobatched_with` > 0)."""
        handle = self.workers[worker_id]
        self._deliver(handle, handle.process, rendered(message, worker_id, salt=salt, cobatched_with=cobatched_with))

    def answer_batch(self, worker_id: str, batch: RenderBatch, salt: str = "") -> None:
        """The worker finishes every image of a co-batched call, in order."""
        for image in batch.images:
            self.answer(worker_id, image, salt, len(batch.images) - 1)

    def step(self, worker_id: str, message: RenderImage, step: int, steps: int) -> None:
        """The worker finished denoising step `step` of `steps` of `message` (with a preview if it asked for them)."""
        handle = self.workers[worker_id]
        preview = fake_preview(message, step) if message.previews else None
        self._deliver(handle, handle.process, ImageStep(message.job_id, message.index, worker_id, step, steps, preview))

    def stop_canceled(self, worker_id: str, message: RenderImage, steps_done: int) -> None:
        """The worker saw its cancel flag and stopped `message` after `steps_done` steps (it is idle again)."""
        handle = self.workers[worker_id]
        self._deliver(handle, handle.process, ImageCanceled(message.job_id, message.index, worker_id, steps_done))

    def fail(self, worker_id: str, message: RenderImage, error_type: str = "generation_failed") -> None:
        """The worker reports that `message` failed (a job error; the worker keeps serving)."""
        handle = self.workers[worker_id]
        self._deliver(handle, handle.process, ImageFailed(message.job_id, message.index, worker_id, error_type, "boom"))

    def die(self, worker_id: str) -> None:
        """The worker process exits; the pool restarts it after its backoff (tests call `ready` again)."""
        handle = self.workers[worker_id]
        self._deliver(handle, handle.process, WorkerExited(worker_id, -9))

    def fail_start(self, worker_id: str, message: str = "sha256 mismatch") -> None:
        """The worker cannot start (a deterministic failure: the pool does not restart it)."""
        handle = self.workers[worker_id]
        self._deliver(handle, handle.process, WorkerFailed(worker_id, "model_unavailable", message))
        self._deliver(handle, handle.process, WorkerExited(worker_id, 1))

    def give_up(self, worker_id: str) -> None:
        """The worker crashed too often in a row: the pool marks it failed for good."""
        handle = self.workers[worker_id]
        handle.crashes_in_row = MAX_RAPID_CRASHES
        self._deliver(handle, handle.process, WorkerExited(worker_id, -9))


def answering_app(settings: Any) -> Any:  # noqa: ANN401 - Settings in, FastAPI out (imported lazily)
    """The real app over a FakePool whose workers get ready and answer at once (no processes, no torch)."""
    from app.main import create_app

    return create_app(settings, pool_factory=lambda configs: FakePool(configs, auto=True))
