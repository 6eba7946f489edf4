"""Co-batched generation: several compatible images in one diffusers call, each bitwise equal to its single run.

Compatible images share model, size, steps, sampler and guidance (`GenerationParams.cobatch_key`);
prompts and seeds may differ. Each image keeps its own CPU generator, so initial and ancestral noise
are the draws of its single run; the batch-invariant linears (`app.pipeline.batch_invariance`) give
each image the arithmetic of its single run; each image is decoded alone, as a single run decodes it.
Whether that makes every bit equal on this machine and shape is proven by `prove_batch_sizes`, never
assumed: the worker co-batches only the (model, shape, batch size) it proved.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.params import GenerationParams
from app.pipeline.batch_invariance import apply_batch_invariance, cobatched
from app.pipeline.families import FAMILIES
from app.pipeline.generate import RenderedImage, finish_image, render_image, step_callback, token_warnings
from app.pipeline.loader import LoadedModel, make_scheduler, pipeline_view
from app.telemetry.tracing import child_span

StepListener = Callable[..., None]  # on_step(step, steps): the step every image of the batch just finished

# The proof's prompts differ from image to image, as a real batch's may.
PROOF_PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk", "a bowl of fruit, oil painting",
                 "a portrait of an astronaut", "a mountain valley panorama", "a red bicycle in the rain",
                 "a city street at night", "a field of sunflowers")


def render_batch(
    model: LoadedModel, images: Sequence[GenerationParams], on_step: StepListener | None = None
) -> list[RenderedImage]:
    """Generate compatible images in one pipeline call; image k is bitwise its `render_image` run when proven.

    `on_step(step, steps)` is called after each denoising step of the whole batch; it reads nothing,
    and an exception it raises stops every image of the batch there.
    """
    import torch

    started = time.perf_counter()
    # 1. Only compatible images share a call; a lone image is a single run.
    if len({p.cobatch_key() for p in images}) != 1:
        raise ValueError("render_batch got images that cannot share a pipeline call")
    if len(images) == 1:
        return [render_image(model, images[0], on_step)]
    first = images[0]
    warnings = [token_warnings(model, p) for p in images]

    # 2. A scheduler of this call's own, over the model's batch-invariant modules.
    apply_batch_invariance(model.pipe)
    scheduler = make_scheduler(model, first.sampler)
    pipe = pipeline_view(model, scheduler)

    # 3. Each image's own CPU generator: initial and ancestral noise are drawn image by image, as alone.
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in images]

    # 4. The family's conditioning: the same size for every image, so the same record.
    conditioning = FAMILIES[model.entry.family].conditioning(
        width=first.width, height=first.height, negative_prompt=first.negative_prompt, pipe_config=pipe.config
    )
    extra = conditioning.call_kwargs() if conditioning else {}
    if on_step is not None:
        extra.update(callback_on_step_end=step_callback(on_step), callback_on_step_end_tensor_inputs=[])
    negatives = None if conditioning and conditioning.zero_negative_prompt else [p.negative_prompt for p in images]

    with torch.inference_mode(), cobatched(len(images)):
        # 5. Denoise every image in one call; each (uncond, cond) pair is computed as in its single run.
        with child_span("denoise"):
            latents = pipe(
                prompt=[p.prompt for p in images],
                negative_prompt=negatives,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                num_images_per_prompt=1,
                generator=generators,
                output_type="latent",
                **extra,
            ).images
    # 6. Each image is hashed and decoded alone; its time is its share of the call.
    share = (time.perf_counter() - started) / len(images)
    results = []
    for k, params in enumerate(images):
        began = time.perf_counter()
        result = finish_image(
            model, params, latents[k : k + 1], scheduler=scheduler, warnings=warnings[k],
            conditioning=conditioning, started=began,
        )
        results.append(dataclasses.replace(result, seconds=share + result.seconds))
    return results


def guided(params: GenerationParams) -> bool:
    """Whether classifier-free guidance runs (two UNet rows per image): a proof covers one mode or the other."""
    return params.guidance_scale > 1.0


@dataclass(frozen=True)
class BatchProof:
    """The verdict of one batch size on one (model, shape, guidance mode): co-batch only when `proven`."""

    model: str
    width: int
    height: int
    guided: bool  # with classifier-free guidance (guidance_scale > 1) or without: different UNet batch shapes
    size: int
    proven: bool
    reason: str  # why not, naming the first image that differed; "" when proven
    seconds: float

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for /readyz and the metrics)."""
        return dataclasses.asdict(self)


def proof_images(
    model: LoadedModel, count: int, steps: int | None = None, guidance_scale: float | None = None
) -> list[GenerationParams]:
    """The images a proof renders: the model's defaults (`steps`, `guidance_scale` if given), different prompts,
    seeds 0 … count-1."""
    d = model.entry.defaults
    return [
        GenerationParams(
            model=model.entry.id, prompt=PROOF_PROMPTS[k % len(PROOF_PROMPTS)], negative_prompt="", seed=k,
            steps=steps or d.steps, guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            width=d.width, height=d.height, sampler=d.sampler, num_images=1,
        )
        for k in range(count)
    ]


def prove_batch_sizes(
    model: LoadedModel,
    sizes: Sequence[int],
    *,
    steps: int | None = None,
    guidance_scales: Sequence[float | None] = (None,),
    render_one: Callable[[LoadedModel, GenerationParams], RenderedImage] | None = None,
    render_many: Callable[[LoadedModel, Sequence[GenerationParams]], list[RenderedImage]] | None = None,
) -> list[BatchProof]:
    """Render each batch size co-batched and singly at the model's default shape, once per guidance scale
    (None: the model's default); proven only where every latent and pixel hash is equal. Once a size
    differs, the larger sizes of that guidance mode are not tried (unproven: they run singly).

    `steps` (default: the model's) is how long each proof image denoises: the operations a step runs
    depend on the shape, batch size and guidance mode, not on the step count. `render_one`/`render_many`
    default to the real single and batched paths (tests pass fakes).
    """
    single = render_one or (lambda m, p: render_image(m, p))
    batch = render_many or (lambda m, ps: render_batch(m, ps))
    wanted = sorted({s for s in sizes if s >= 2})
    if not wanted:
        return []
    proofs = []
    for scale in guidance_scales:
        images = proof_images(model, max(wanted), steps, scale)
        alone: list[RenderedImage] = []  # single runs, rendered as far as a batch needs them
        refused = ""
        for size in wanted:
            began = time.perf_counter()
            if refused:  # not tried: a smaller batch in this mode already differed (unproven sizes run singly)
                reason = f"not tried: {refused}"
            else:
                try:
                    alone.extend(single(model, p) for p in images[len(alone) : size])
                    reason = _first_difference(images, alone, batch(model, images[:size]), size)
                except Exception as exc:  # a batch that cannot run is not proven; the worker still serves singles
                    reason = f"a batch of {size} raised {type(exc).__name__}: {exc}"
                refused = reason
            first = images[0]
            proofs.append(
                BatchProof(
                    model=model.entry.id, width=first.width, height=first.height, guided=guided(first), size=size,
                    proven=not reason, reason=reason, seconds=round(time.perf_counter() - began, 3),
                )
            )
    return proofs


def _first_difference(
    images: Sequence[GenerationParams], alone: Sequence[RenderedImage], together: Sequence[RenderedImage], size: int
) -> str:
    """Why a co-batched call is not its single runs (the first image whose hashes differ); "" when all are equal."""
    for k, (p, a, b) in enumerate(zip(images, alone, together, strict=False)):
        if (a.latent_sha256, a.pixel_sha256) != (b.latent_sha256, b.pixel_sha256):
            what = "latents" if a.latent_sha256 != b.latent_sha256 else "pixels"
            mode = f"guidance {p.guidance_scale:g}"
            return (
                f"image {k} (seed {p.seed}) of a batch of {size} at {p.width}x{p.height}, {mode}: {what} differ from "
                f"its single run ({b.latent_sha256[:12]}/{b.pixel_sha256[:12]} vs {a.latent_sha256[:12]}/"
                f"{a.pixel_sha256[:12]})"
            )
    if len(together) != size:
        return f"a batch of {size} returned {len(together)} images"
    return ""
