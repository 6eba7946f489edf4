"""Model families inside a worker: what SD1.x and SDXL pipelines need beyond their shared steps.

Pure data and arithmetic (no torch, no diffusers): the loader and the generator act on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one image: passed to the pipeline exactly as recorded in the manifest."""

    original_size: tuple[int, int]  # (height, width), SDXL's order
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    zero_negative_prompt: bool  # an empty negative prompt conditions on zeros, not on the encoding of ""

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of StableDiffusionXLPipeline.__call__ (negative sizes default to these)."""
        return {
            "original_size": self.original_size,
            "crops_coords_top_left": self.crops_coords_top_left,
            "target_size": self.target_size,
        }

    def record(self) -> dict[str, Any]:
        """The manifest's `conditioning` section (JSON data)."""
        return {
            "original_size": list(self.original_size),
            "crops_coords_top_left": list(self.crops_coords_top_left),
            "target_size": list(self.target_size),
            "negative_original_size": list(self.original_size),
            "negative_crops_coords_top_left": list(self.crops_coords_top_left),
            "negative_target_size": list(self.target_size),
            "zero_negative_prompt": self.zero_negative_prompt,
        }


@dataclass(frozen=True)
class Family:
    """What one model family adds to loading and generation."""

    name: str
    tokenizers: tuple[str, ...]  # pipeline attributes; each truncates prompts on its own
    load_kwargs: Mapping[str, Any]  # to from_pretrained/from_single_file: parts Sameseed never runs
    view_kwargs: Mapping[str, Any]  # to the pipeline constructor, next to components and saved config
    size_conditioning: bool

    def conditioning(
        self, *, width: int, height: int, negative_prompt: str, pipe_config: Mapping[str, Any]
    ) -> SizeConditioning | None:
        """The micro-conditioning of an image of this size: uncropped, original size = target size."""
        if not self.size_conditioning:
            return None
        zeros = negative_prompt == "" and bool(pipe_config.get("force_zeros_for_empty_prompt", False))
        return SizeConditioning(
            original_size=(height, width),
            crops_coords_top_left=(0, 0),
            target_size=(height, width),
            zero_negative_prompt=zeros,
        )


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "sd1": Family(
            name="sd1",
            tokenizers=("tokenizer",),
            # Sameseed never runs the safety checker: it would change pixels behind the user's back.
            load_kwargs=MappingProxyType(
                {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
            ),
            view_kwargs=MappingProxyType({"requires_safety_checker": False}),
            size_conditioning=False,
        ),
        "sdxl": Family(
            name="sdxl",
            tokenizers=("tokenizer", "tokenizer_2"),
            # An invisible watermark would change pixels; Sameseed decodes latents itself anyway.
            load_kwargs=MappingProxyType({"add_watermarker": False}),
            view_kwargs=MappingProxyType({"add_watermarker": False}),
            size_conditioning=True,
        ),
    }
)
