"""Hashes anyone can recompute (DESIGN.md definitions); nothing here imports torch."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy
from PIL import Image


def latent_array(latents: Any) -> numpy.ndarray:
    """One image's final latents as a contiguous float32 CPU array (what latent_sha256 hashes)."""
    return latents.detach().to("cpu").float().contiguous().numpy()


def latents_from_bytes(raw: bytes, shape: tuple[int, ...]) -> numpy.ndarray | None:
    """Rebuild float32 latents a worker sent as raw C-order bytes; None when none were sent."""
    if not raw or not shape:
        return None
    return numpy.frombuffer(raw, dtype=numpy.float32).reshape(shape)


def latent_sha256(array: numpy.ndarray) -> str:
    """sha256 of one image's final latents as `latent_array` gives them (float32, C order)."""
    return hashlib.sha256(array.tobytes()).hexdigest()


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of the image's RGB uint8 pixel bytes (PNG bytes are not hashed: zlib builds differ)."""
    return hashlib.sha256(numpy.asarray(image.convert("RGB"), dtype=numpy.uint8).tobytes()).hexdigest()


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
