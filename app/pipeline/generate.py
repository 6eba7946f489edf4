"""Per-image generation: batch size 1 (the CFG pair stays), CPU noise, hashes of latents and pixels."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from app.params import GenerationParams
from app.pipeline.families import FAMILIES
from app.pipeline.loader import LoadedModel, json_config, make_scheduler, pipeline_view
from app.pipeline.previews import preview_png
from app.provenance.hashes import latent_array, latent_sha256, pixel_sha256
from app.telemetry.tracing import child_span


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
    vae_upcast: bool = False  # the VAE's own dtype decoded to NaN/Inf; these pixels were decoded in float32
    conditioning: dict[str, Any] | None = None  # SDXL size/crop micro-conditioning, as passed
    latents: bytes = b""  # the final latents, float32 C-order: sha256 of these bytes is latent_sha256
    latent_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Decoded:
    """Pixels decoded from final latents, and whether the VAE had to run in float32 to get them."""

    pixels: Any  # a (1, 3, H, W) tensor in [-1, 1]
    upcast: bool
    vae_dtype: str  # the VAE's own dtype, e.g. "float16"


def token_warnings(model: LoadedModel, params: GenerationParams) -> list[dict[str, Any]]:
    """Warn for each prompt longer than a text encoder reads, naming how many tokens are dropped."""
    found: list[dict[str, Any]] = []
    for attribute in FAMILIES[model.entry.family].tokenizers:
        tokenizer = getattr(model.pipe, attribute)
        limit = int(tokenizer.model_max_length)
        for name in ("prompt", "negative_prompt"):
            ids = tokenizer(getattr(params, name), truncation=False).input_ids
            if len(ids) <= limit:
                continue
            dropped = len(ids) - limit
            lost = tokenizer.decode(ids[limit - 1 : -1])
            warning = {
                "code": f"{name}_truncated",
                "param": name,
                "message": (
                    f"{name} is {len(ids) - 2} tokens; the text encoder reads {limit - 2}, "
                    f"so the last {dropped} were dropped: {lost!r}"
                ),
            }
            if warning not in found:  # SDXL's two tokenizers usually drop the same tokens
                found.append(warning)
    return found


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (no metadata yet)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_latents(vae: Any, latents: Any) -> Decoded:
    """Decode final latents in the VAE's dtype; on NaN/Inf decode the same latents again in float32.

    The VAE's weights are converted to float32 and back around the second decode: float16 and
    bfloat16 values survive that round trip exactly, so later images see the same VAE.
    """
    import torch

    dtype = vae.dtype
    pixels = _decode(vae, latents)
    if bool(torch.isfinite(pixels).all()):
        return Decoded(pixels=pixels, upcast=False, vae_dtype=str(dtype).removeprefix("torch."))
    if dtype == torch.float32:
        raise FloatingPointError("the VAE decoded these latents to NaN/Inf in float32")
    vae.to(torch.float32)
    try:
        pixels = _decode(vae, latents.to(torch.float32))
    finally:
        vae.to(dtype)
    if not bool(torch.isfinite(pixels).all()):
        raise FloatingPointError(f"the VAE decoded these latents to NaN/Inf in {dtype} and again in float32")
    return Decoded(pixels=pixels, upcast=True, vae_dtype=str(dtype).removeprefix("torch."))


def _decode(vae: Any, latents: Any) -> Any:
    """Undo the VAE's latent scaling (and SDXL-style mean/std when configured) and decode, as diffusers does."""
    import torch

    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def vae_upcast_warning(decoded: Decoded, seed: int) -> dict[str, Any]:
    """The manifest warning for an image whose pixels come from a float32 re-decode."""
    return {
        "code": "vae_upcast",
        "param": None,
        "message": (
            f"the {decoded.vae_dtype} VAE decoded the latents of seed {seed} to NaN/Inf; the same latents "
            "were decoded again with the VAE in float32 (latents and latent_sha256 are unchanged)"
        ),
    }


StepListener = Callable[..., None]  # on_step(step, steps), with previews on_step(step, steps, preview=png)


def step_callback(on_step: StepListener) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` that only reports (step done, of how many): it returns no tensors,
    so the pipeline keeps its own latents untouched; a listener may raise to stop the pipeline."""

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
        on_step(index + 1, int(getattr(pipe, "num_timesteps", 0) or 0))
        return {}

    return callback


def preview_callback(on_step: Callable[..., None], family: str) -> Callable[..., dict[str, Any]]:
    """Like `step_callback`, and also hands the listener `preview=` a small PNG made from a copy of the latents.

    It returns no tensors, so the pipeline goes on with its own latents, which nothing here changed.
    """

    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
        preview = preview_png(tensors["latents"], family)
        on_step(index + 1, int(getattr(pipe, "num_timesteps", 0) or 0), preview=preview)
        return {}

    return callback


def render_image(
    model: LoadedModel, params: GenerationParams, on_step: StepListener | None = None, *, previews: bool = False
) -> RenderedImage:
    """Generate one image deterministically: same model, runtime and params give the same bits.

    `on_step(step, steps)` is called after each denoising step; it reads nothing, so the bits are
    the same with or without it, and an exception it raises stops the image there. With `previews`
    it is called `on_step(step, steps, preview=png)`: a low-resolution PNG approximated from a copy
    of the latents, which never changes the image.
    """
    import torch

    started = time.perf_counter()
    # 1. Check the prompt length against every text encoder and note any truncation.
    warnings = token_warnings(model, params)

    # 2. A scheduler of this request's own: shared schedulers corrupt latents under concurrency.
    scheduler = make_scheduler(model, params.sampler)
    pipe = pipeline_view(model, scheduler)

    # 3. All noise, initial and ancestral, from one CPU generator seeded with this image's seed.
    generator = torch.Generator("cpu").manual_seed(params.seed)

    # 4. The family's extra conditioning (SDXL: size and crop), passed exactly as it is recorded.
    conditioning = FAMILIES[model.entry.family].conditioning(
        width=params.width, height=params.height, negative_prompt=params.negative_prompt, pipe_config=pipe.config
    )
    extra = conditioning.call_kwargs() if conditioning else {}
    if on_step is not None and previews:  # the latents are read (copied), and the callback returns none back
        callback = preview_callback(on_step, model.entry.family)
        extra.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    elif on_step is not None:  # no tensor inputs: the callback is handed nothing it could change
        extra.update(callback_on_step_end=step_callback(on_step), callback_on_step_end_tensor_inputs=[])
    negative_prompt = None if conditioning and conditioning.zero_negative_prompt else params.negative_prompt

    with torch.inference_mode():
        # 5. Denoise to the final latents at batch size 1 (the CFG pair stays in one batch).
        with child_span("denoise"):
            latents = pipe(
                prompt=params.prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                width=params.width,
                height=params.height,
                num_images_per_prompt=1,
                generator=generator,
                output_type="latent",
                **extra,
            ).images

    # 6.-8. Hash the latents, decode them and hash the pixels (as every co-batched image is finished too).
    return finish_image(
        model, params, latents, scheduler=scheduler, warnings=warnings, conditioning=conditioning, started=started
    )


def finish_image(
    model: LoadedModel,
    params: GenerationParams,
    latents: Any,  # noqa: ANN401 - a (1, C, h, w) tensor of one image's final latents
    *,
    scheduler: Any,  # noqa: ANN401 - the diffusers scheduler that ran
    warnings: list[dict[str, Any]],
    conditioning: Any,  # noqa: ANN401 - the family's SizeConditioning or None
    started: float,
    seconds: float | None = None,
) -> RenderedImage:
    """Hash one image's final latents, decode them alone (batch size 1), hash the pixels and encode the PNG."""
    import torch

    with torch.inference_mode():
        # 6. Hash the latents before VAE scaling and decode (DESIGN.md's latent_sha256).
        final = latent_array(latents[0])  # kept so a replay can measure latent drift against it
        latent_hash = latent_sha256(final)

        # 7. Decode without the safety checker or a watermark; NaN/Inf pixels are decoded again in float32.
        with child_span("decode"):
            decoded = decode_latents(model.pipe.vae, latents)
            image = model.pipe.image_processor.postprocess(
                decoded.pixels, output_type="pil", do_denormalize=[True]
            )[0]
    if decoded.upcast:
        warnings.append(vae_upcast_warning(decoded, params.seed))

    # 8. Hash the pixels and encode the PNG.
    return RenderedImage(
        image=image,
        png=encode_png(image),
        latent_sha256=latent_hash,
        latents=final.tobytes(),
        latent_shape=tuple(final.shape),
        pixel_sha256=pixel_sha256(image),
        scheduler={"class_name": type(scheduler).__name__, "config": json_config(scheduler.config)},
        seconds=time.perf_counter() - started if seconds is None else seconds,
        warnings=warnings,
        vae_upcast=decoded.upcast,
        conditioning=conditioning.record() if conditioning else None,
    )
