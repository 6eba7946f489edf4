"""Low-resolution step previews: latents mapped to RGB by a fixed linear approximation, never by the VAE.

A preview is for a person watching progress: one pixel per latent cell (width/8 x height/8 on SD 1.x
and SDXL), from a detached CPU float32 copy of the latents, so the pipeline's own tensors are never
touched and the image and its hashes are the same with or without previews.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

# The widely used 4x3 latent->RGB factors of the SD 1.x VAE (as in ComfyUI's and A1111's "approx NN"
# cheap previews): rgb = latents(h, w, 4) @ factors, in about [-1, 1].
SD1_FACTORS = np.array(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
    dtype=np.float32,
)
# The SDXL VAE's own factors and bias (ComfyUI's SDXL latent format): its latent space differs from SD 1.x.
SDXL_FACTORS = np.array(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    dtype=np.float32,
)
SDXL_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def latent_rgb(latents: np.ndarray, family: str) -> Image.Image:
    """The RGB approximation of one image's latents, shape (4, h, w) float32, as an h x w image."""
    if latents.ndim != 3 or latents.shape[0] != 4:
        raise ValueError(f"previews need latents of shape (4, h, w), not {latents.shape}")
    factors, bias = (SDXL_FACTORS, SDXL_BIAS) if family == "sdxl" else (SD1_FACTORS, np.zeros(3, np.float32))
    rgb = np.tensordot(latents.transpose(1, 2, 0), factors, axes=1) + bias  # (h, w, 3) in about [-1, 1]
    pixels = np.clip((rgb + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels))  # uint8 (h, w, 3): RGB


def preview_png(latents: Any, family: str) -> bytes:  # noqa: ANN401 - a torch tensor (1, 4, h, w) of the pipeline
    """A small PNG of the first image in a latents batch; reads a detached CPU float32 copy, never the tensor itself."""
    import torch

    copy = latents.detach().to("cpu", torch.float32, copy=True)[0].numpy()
    buffer = io.BytesIO()
    latent_rgb(copy, family).save(buffer, format="PNG")
    return buffer.getvalue()
