"""The fp16 VAE guard on a forced overflow: the service's `decode_latents`, on a VAE made to overflow."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# Factors the decoder's last convolution is scaled by until float16 overflows (float32 does not).
FACTORS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)


def state_digest(module: Any) -> str:
    """sha256 over a module's parameters' bytes, in name order (any change in dtype or value shows)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def forced_overflow_check(vae_dir: Path, device: str, size: int) -> tuple[bool, str, dict[str, Any]]:
    """Scale the float16 decoder's output convolution until its decode is NaN/Inf, then check the guard.

    Passes when `decode_latents` reports the upcast, its pixels are finite and bitwise equal to a
    float32 decode of the same weights and latents, and the VAE is float16 again with unchanged weights.
    """
    import copy

    import torch
    from diffusers import AutoencoderKL

    from app.pipeline.generate import _decode, decode_latents

    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float16, use_safetensors=True).to(device).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn((1, 4, size // factor, size // factor), generator=generator).to(device, torch.float16)
    conv = vae.decoder.conv_out
    original = conv.weight.detach().clone()
    with torch.inference_mode():
        plain = decode_latents(vae, latents)
        for scale in FACTORS:
            forced = (original.float() * scale).to(torch.float16)
            if not bool(torch.isfinite(forced).all()):
                break
            conv.weight.copy_(forced)
            before = state_digest(vae)
            reference = _decode(copy.deepcopy(vae).to(torch.float32), latents.to(torch.float32))
            result = decode_latents(vae, latents)
            if not result.upcast:
                continue
            after = state_digest(vae)
            evidence = {
                "scale": scale, "unforced_upcast": plain.upcast, "upcast": result.upcast,
                "vae_dtype_after": str(vae.dtype), "weights_unchanged": before == after,
                "pixels_finite": bool(torch.isfinite(result.pixels).all()),
                "equals_float32_decode": bool(torch.equal(result.pixels, reference)),
            }
            ok = (evidence["pixels_finite"] and evidence["equals_float32_decode"] and evidence["weights_unchanged"]
                  and vae.dtype == torch.float16)
            detail = (f"conv_out x{scale:g} overflows float16; decoded again in float32: finite, "
                      f"{'bitwise equal to' if evidence['equals_float32_decode'] else 'DIFFERENT from'} a float32 "
                      f"decode, VAE back to {str(vae.dtype).removeprefix('torch.')}"
                      f"{'' if evidence['weights_unchanged'] else ', weights CHANGED'}")
            return ok, detail, evidence
    return False, f"no factor in {FACTORS} made the float16 decode overflow", {"unforced_upcast": plain.upcast}
