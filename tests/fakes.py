"""A worker pool you can drive by hand: no processes, no torch."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import numpy
from PIL import Image

from app.worker.messages import ImageFailed, ImageRendered, RenderImage, WorkerConfig, WorkerReady
from app.worker.pool import WorkerExited, WorkerHandle, WorkerState

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


def rendered(message: RenderImage, worker_id: str = "w0", key: str = FAKE_KEY, salt: str = "") -> ImageRendered:
    """A plausible ImageRendered whose hashes depend only on the parameters (like the real thing)."""
    params = (
        message.model,
        message.prompt,
        message.negative_prompt,
        message.seed,
        message.steps,
        message.guidance_scale,
        message.width,
        message.height,
        message.sampler,
    )
    png, pixel_hash = fake_png(message.width, message.height, "pixel", *params)
    return ImageRendered(
        job_id=message.job_id,
        index=message.index,
        worker_id=worker_id,
        seed=message.seed,
        latent_sha256=fake_hash("latent", salt, *params),
        pixel_sha256=pixel_hash,
        png=png,
        width=message.width,
        height=message.height,
        seconds=0.01,
        model={
            "id": message.model,
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


class FakePool:
    """Records what the dispatcher sends; the test decides when workers get ready or answer."""

    def __init__(self, configs: list[WorkerConfig], sink: Any, *, auto: bool = False) -> None:
        self.workers = {c.worker_id: WorkerHandle(config=c) for c in configs}
        self.sink = sink
        self.auto = auto
        self.sent: list[tuple[str, Any]] = []
        self.stopped = False

    def start(self) -> None:
        if self.auto:
            for worker_id in self.workers:
                self.ready(worker_id)

    def ready(self, worker_id: str, group_key: str = "g1", models: dict[str, Any] | None = None) -> None:
        handle = self.workers[worker_id]
        handle.state, handle.group_key, handle.pid = WorkerState.READY, group_key, 1000
        handle.models = dict(models or {})
        handle.runtime = dict(RUNTIME)
        self.sink(handle, WorkerReady(worker_id, 1000, dict(RUNTIME), group_key, {}, 0.1))

    def send(self, handle: WorkerHandle, message: Any) -> bool:
        self.sent.append((handle.id, message))
        if self.auto and isinstance(message, RenderImage):
            asyncio.get_running_loop().call_soon(self.answer, handle.id, message)
        return True

    def answer(self, worker_id: str, message: RenderImage, salt: str = "") -> None:
        self.sink(self.workers[worker_id], rendered(message, worker_id, salt=salt))

    def fail(self, worker_id: str, message: RenderImage, error_type: str = "generation_failed") -> None:
        self.sink(self.workers[worker_id], ImageFailed(message.job_id, message.index, worker_id, error_type, "boom"))

    def die(self, worker_id: str) -> None:
        handle = self.workers[worker_id]
        handle.state = WorkerState.RESTARTING
        self.sink(handle, WorkerExited(worker_id, -9))

    async def stop(self, timeout_s: float = 10.0) -> None:
        self.stopped = True
