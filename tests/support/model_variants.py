"""Model variants made from the committed tiny models: a single-file checkpoint, an fp16-overflowing VAE."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.models import build

MODELS = Path(build.__file__).resolve().parent
TINY = MODELS / "sameseed-tiny"
TINY_XL = MODELS / "sameseed-tiny-xl"
# float16 holds weights up to 65,504: these stay representable, the activations they make do not.
HOT_VAE_SCALE = 1e4


def write_single_file(out_dir: Path) -> tuple[Path, Path]:
    """The tiny SD1 model as one original-layout checkpoint plus its weight-free config folder."""
    from app.models.checkpoint import write_sd1_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_sd1_checkpoint(TINY, out_dir / "sameseed-tiny.safetensors")
    config = out_dir / "sameseed-tiny-config"
    shutil.copytree(TINY, config, ignore=shutil.ignore_patterns("*.safetensors"))
    return checkpoint, config


def write_hot_vae(out_dir: Path) -> Path:
    """A copy of the tiny SDXL VAE whose first decoder layer overflows float16 (finite in float32).

    The decoder's next layer is a GroupNorm, which undoes the scale: in float32 the pixels stay
    ordinary, in float16 the activations become Inf and then NaN, as SDXL's VAE does at 1024 px.
    """
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_XL / "vae" / "config.json", out_dir / "config.json")
    weights = load_file(TINY_XL / "vae" / "diffusion_pytorch_model.safetensors")
    for name in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        weights[name] = weights[name] * HOT_VAE_SCALE
    save_file(weights, out_dir / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return out_dir
