"""Sample generations (manifest + real PNGs) for provenance tests, without workers or torch."""

from __future__ import annotations

import uuid

from app.params import GenerationParams
from app.provenance.manifest import Manifest, build_manifest
from app.worker.messages import RenderImage
from tests.support.fakes import rendered


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
    params = GenerationParams(model, prompt, negative_prompt, seed, 20, 7.5, 64, 64, "euler_a", num_images)
    images = [rendered(RenderImage(generation_id, k, params.image(k)), key=key) for k in range(num_images)]
    manifest = build_manifest(
        generation_id=generation_id,
        request=params,
        model=images[0].model,
        scheduler=images[0].scheduler,
        runtime=images[0].runtime,
        images=[i.image for i in images],
        warnings=[],
        received=received,
        started=received,
        finished=received,
    )
    return manifest, [i.png for i in images]
