"""Sample generations (manifest + real PNGs) for provenance tests, without workers or torch."""

from __future__ import annotations

import uuid

from app.provenance.manifest import Manifest, build_manifest
from app.worker.messages import RenderImage
from tests.fakes import rendered


def sample_generation(
    *,
    prompt: str = "a photo of a cat",
    negative_prompt: str = "",
    seed: int = 7,
    num_images: int = 2,
    model: str = "sameseed-tiny",
    key: str = "rk1-" + "f" * 64,
    received: str = "2026-01-01T00:00:00.000000Z",
    generation_id: str | None = None,
) -> tuple[Manifest, list[bytes]]:
    """An unsigned manifest and its PNGs (no metadata), as the dispatcher hands them over."""
    generation_id = generation_id or f"gen_{uuid.uuid4().hex}"
    messages = [
        RenderImage(generation_id, k, model, prompt, negative_prompt, seed + k, 20, 7.5, 64, 64, "euler_a")
        for k in range(num_images)
    ]
    images = [rendered(m, key=key) for m in messages]
    manifest = build_manifest(
        generation_id=generation_id,
        request={
            "model": model,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": 20,
            "guidance_scale": 7.5,
            "width": 64,
            "height": 64,
            "sampler": "euler_a",
            "num_images": num_images,
        },
        model=images[0].model,
        scheduler=images[0].scheduler,
        runtime=images[0].runtime,
        images=[
            {
                "index": i.index,
                "seed": i.seed,
                "latent_sha256": i.latent_sha256,
                "pixel_sha256": i.pixel_sha256,
                "width": i.width,
                "height": i.height,
                "worker_id": i.worker_id,
            }
            for i in images
        ],
        warnings=[],
        received=received,
        started=received,
        finished=received,
    )
    return manifest, [i.png for i in images]
