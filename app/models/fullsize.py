"""Random-weight pipelines built from a shipped config folder: the full-size SD1.5 architecture, no download.

``build_from_configs`` reads the UNet, VAE and text-encoder configs of a diffusers config folder
(``configs/sd15`` ships SD1.5's), builds each module and fills every weight from the same
platform-independent numpy stream as the embedded tiny models (``app.models.build``), so a given
(config folder, seed, dtype) gives the same files on every machine. The modules have the real
architecture, hence the real FLOPs: what a GPU check needs, without a model hub.
``overrides`` shrinks a component (the CPU dry run uses :data:`TINY_OVERRIDES`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.models.build import (
    _add_text_model_prefix,
    canonicalize_json_files,
    fill_deterministic_weights,
    normalize_modes,
)

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
FULLSIZE_SEED = 15  # the fixed seed of the devicecheck model: weight streams 15000, 15001, 15002
COMPONENTS = ("unet", "vae", "text_encoder")
DTYPES = ("float32", "float16", "bfloat16")

# SD1.5's layout (4 UNet levels, 4 VAE levels: scale factor 8, full CLIP vocabulary) at toy widths,
# so the CPU dry run exercises the same builder, loader and pipeline in seconds.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
             "cross_attention_dim": 32, "attention_head_dim": 4, "sample_size": 8},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "projection_dim": 32},
}


def component_configs(config_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict]:
    """The UNet, VAE and text-encoder configs of a config folder, with `overrides` applied per component."""
    configs: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        config = json.loads((Path(config_dir) / name / "config.json").read_text(encoding="utf-8"))
        config.update((overrides or {}).get(name, {}))
        configs[name] = config
    return configs


def _modules(configs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_") and k != "architectures"}
    return {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
    }


def parameter_counts(config_dir: Path = SD15_CONFIG_DIR, overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Parameters per component of the architecture a config folder describes (built on the meta device)."""
    with torch.device("meta"):
        modules = _modules(component_configs(config_dir, overrides))
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def build_from_configs(
    config_dir: Path,
    out_dir: Path,
    *,
    seed: int = FULLSIZE_SEED,
    dtype: str = "float16",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a loadable diffusers folder with deterministic random weights in `dtype`; return `out_dir`.

    The folder's tokenizer, scheduler and model index are the config folder's, copied byte for
    byte; the weights are safetensors. An existing `out_dir` is replaced.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    config_dir, out_dir = Path(config_dir), Path(out_dir)
    configs = component_configs(config_dir, overrides)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        for name in ("model_index.json", "scheduler", "tokenizer"):
            source = config_dir / name
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, tmp / name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the modules' own init is overwritten; seeded so nothing depends on it
            modules = _modules(configs)
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its advice on casting concerns fine-tuning, not this
        try:
            for index, name in enumerate(COMPONENTS):
                module = modules[name]
                fill_deterministic_weights(module, seed * 1000 + index)
                module.to(getattr(torch, dtype)).eval()
                module.save_pretrained(tmp / name, safe_serialization=True)
                del modules[name], module  # full size: keep one component's weights in memory at a time
        finally:
            diffusers_logging.set_verbosity(level)
        _add_text_model_prefix(tmp / "text_encoder" / "model.safetensors")
        canonicalize_json_files(tmp)
        normalize_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
