"""Batch-invariant operations: inside a co-batched pipeline call, every image gets the bits of its single run.

Measured on these CPUs (torch 2.13, oneDNN on and off): `nn.Linear` on 2-D input with few rows (the
UNet's time embedding, the resnets' time projections, SDXL's added embeddings, a text encoder's
pooled projection) picks a different kernel for a different row count, so its rows change bits with
the batch size. Token linears (3-D input), convolutions, group and layer norms and attention gave
equal rows. So, while `cobatched(n)` is active, a 2-D linear is computed image by image on exactly
the rows that image's single run computes together:

- n rows (one per image: a text encoder's pooled output, or the UNet without guidance): one row at a time;
- 2n rows (the UNet with classifier-free guidance: [uncond 1..n, cond 1..n]): rows (i, n + i) together,
  the (uncond, cond) pair of image i, exactly the 2-row call of its single run.

Outside `cobatched` the linears run as plain `nn.Linear`: single runs are plain diffusers, bit for bit.
Whether this is enough on a given machine, shape and model is not assumed: the worker proves it
(`app.pipeline.batched.prove_batch_sizes`) before co-batching anything.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_IMAGES: contextvars.ContextVar[int] = contextvars.ContextVar("sameseed_cobatched_images", default=0)


def _make_class() -> type:
    import torch
    from torch.nn import functional

    class BatchInvariantLinear(torch.nn.Linear):
        """An `nn.Linear` whose 2-D rows are computed in the groups of a single run while `cobatched` is active."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - the class docstring says it
            images = _IMAGES.get()
            if images < 2 or x.dim() != 2 or x.shape[0] not in (images, 2 * images):
                return super().forward(x)
            if x.shape[0] == images:  # one row per image: each image's single run has one row
                rows = [functional.linear(x[i : i + 1].contiguous(), self.weight, self.bias) for i in range(images)]
                return torch.cat(rows, 0)
            # [uncond 1..n, cond 1..n]: image i's single run computes its (uncond, cond) pair as 2 rows
            pairs = [
                functional.linear(x[[i, images + i]].contiguous(), self.weight, self.bias) for i in range(images)
            ]
            return torch.cat([p[0:1] for p in pairs] + [p[1:2] for p in pairs], 0)

    return BatchInvariantLinear


_CLASS: type | None = None


def invariant_linear_class() -> type:
    """The `nn.Linear` subclass `apply_batch_invariance` swaps in (built once, on first use: torch is lazy)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def apply_batch_invariance(pipe: Any) -> int:  # noqa: ANN401 - any diffusers pipeline
    """Make every plain `nn.Linear` of the pipeline's modules batch-invariant (idempotent); returns how many.

    The swap changes no weight and no computation outside `cobatched`: the class's forward is
    `nn.Linear.forward` there.
    """
    import torch

    cls = invariant_linear_class()
    swapped = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = cls
                swapped += 1
    return swapped


@contextlib.contextmanager
def cobatched(images: int) -> Iterator[None]:
    """Within this block, batch-invariant linears compute `images` co-batched images as their single runs do."""
    token = _IMAGES.set(images)
    try:
        yield
    finally:
        _IMAGES.reset(token)
