"""Per-image generation: batch size 1 (the CFG pair stays), CPU noise, hashes of latents and pixels."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from app.pipeline.loader import LoadedModel, json_config, make_scheduler, pipeline_view
from app.provenance.hashes import latent_sha256, pixel_sha256


@dataclass(frozen=True)
class ImageParams:
    """The effective parameters of one image."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str


@dataclass(frozen=True)
class RenderedImage:
    """One generated image, its hashes and what ran it."""

    image: Image.Image
    png: bytes
    latent_sha256: str
    pixel_sha256: str
    scheduler: dict[str, Any]
    seconds: float
    warnings: list[dict[str, Any]] = field(default_factory=list)


def token_warnings(model: LoadedModel, params: ImageParams) -> list[dict[str, Any]]:
    """Warn for each prompt longer than the text encoder reads, naming how many tokens are dropped."""
    tokenizer = model.pipe.tokenizer
    limit = int(tokenizer.model_max_length)
    found = []
    for name in ("prompt", "negative_prompt"):
        ids = tokenizer(getattr(params, name), truncation=False).input_ids
        if len(ids) > limit:
            dropped = len(ids) - limit
            lost = tokenizer.decode(ids[limit - 1 : -1])
            found.append(
                {
                    "code": f"{name}_truncated",
                    "param": name,
                    "message": (
                        f"{name} is {len(ids) - 2} tokens; the text encoder reads {limit - 2}, "
                        f"so the last {dropped} were dropped: {lost!r}"
                    ),
                }
            )
    return found


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (no metadata yet)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_image(model: LoadedModel, params: ImageParams) -> RenderedImage:
    """Generate one image deterministically: same model, runtime and params give the same bits."""
    import torch

    started = time.perf_counter()
    # 1. Check the prompt length against the text encoder and note any truncation.
    warnings = token_warnings(model, params)

    # 2. A scheduler of this request's own: shared schedulers corrupt latents under concurrency.
    scheduler = make_scheduler(model, params.sampler)
    pipe = pipeline_view(model, scheduler)

    # 3. All noise, initial and ancestral, from one CPU generator seeded with this image's seed.
    generator = torch.Generator("cpu").manual_seed(params.seed)

    with torch.inference_mode():
        # 4. Denoise to the final latents at batch size 1 (the CFG pair stays in one batch).
        latents = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            width=params.width,
            height=params.height,
            num_images_per_prompt=1,
            generator=generator,
            output_type="latent",
        ).images

        # 5. Hash the latents before VAE scaling and decode (DESIGN.md's latent_sha256).
        latent_hash = latent_sha256(latents[0])

        # 6. Decode exactly as the pipeline does, without the safety checker.
        vae = model.pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        image = model.pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True])[0]

    # 7. Hash the pixels and encode the PNG.
    return RenderedImage(
        image=image,
        png=encode_png(image),
        latent_sha256=latent_hash,
        pixel_sha256=pixel_sha256(image),
        scheduler={"class_name": type(scheduler).__name__, "config": json_config(scheduler.config)},
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )
