"""Original-layout (CompVis/LDM) single-file SD1.x checkpoints: the config folder they load with, and a writer.

A real SD1.x checkpoint such as ``v1-5-pruned-emaonly-fp16.safetensors`` keeps the original key
names: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (CLIP text encoder). diffusers' ``from_single_file`` renames
them with the help of a diffusers-format config folder; Sameseed ships that folder for SD1.x
(``configs/sd15``, built by :func:`build_sd15_config`) so loading never needs a model hub.
:func:`write_sd1_checkpoint` does the reverse renaming, so tests can turn the tiny model into a
single file and check it gives the same latents as its folder form.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from app.models.build import build_clip_tokenizer_files, canonicalize_json_files, normalize_modes, write_json

# The component configs of stable-diffusion-v1-5 (identical for every SD1.x release).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# OpenAI's CLIP ViT-L/14 text tower, with the (legacy) token ids its published config carries.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_CONFIG_FILES: tuple[str, ...] = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def build_sd15_config(out_dir: Path) -> Path:
    """Write the diffusers-format SD1.x config folder (configs and the full CLIP tokenizer; no weights)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from app.models.build import SD15_PNDM_CONFIG

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        write_json(tmp / "model_index.json", SD15_MODEL_INDEX)
        PNDMScheduler.from_config(SD15_PNDM_CONFIG).save_config(tmp / "scheduler")
        # Built on the meta device: the full configs as diffusers writes them, without a byte of weights.
        with torch.device("meta"):
            UNet2DConditionModel(**SD15_UNET_CONFIG).save_config(tmp / "unet")
            AutoencoderKL(**SD15_VAE_CONFIG).save_config(tmp / "vae")
        CLIPTextConfig(**SD15_TEXT_CONFIG)  # refuse a config transformers cannot read
        (tmp / "text_encoder").mkdir()
        write_json(tmp / "text_encoder" / "config.json", SD15_TEXT_CONFIG)
        build_clip_tokenizer_files(tmp / "tokenizer", None)
        canonicalize_json_files(tmp)
        found = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        if found != sorted(SD15_CONFIG_FILES):
            raise RuntimeError(f"unexpected config files: {found}")
        normalize_modes(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------- diffusers -> original keys

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of ``rest`` (e.g. "norm1.weight") by ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def original_unet_key(key: str, layers_per_block: int, attention_up_blocks: set[int]) -> str:
    """The original key of a diffusers UNet2DConditionModel (SD1.x layout) key."""
    per_level = layers_per_block + 1  # each level: its layers, then a down/upsampler slot
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0." + _rename_first(m[3], _UNET_RESNET),
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"middle_block.{2 * int(m[1])}." + _rename_first(m[2], _UNET_RESNET),
        ),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0." + _rename_first(m[3], _UNET_RESNET),
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: (
                f"output_blocks.{int(m[1]) * per_level + layers_per_block}."
                f"{2 if int(m[1]) in attention_up_blocks else 1}.conv.{m[2]}"
            ),
        ),
    ]
    renamed = _rename_first(key, _UNET_FIXED)
    if renamed != key:
        return renamed
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def original_vae_key(key: str, num_up_blocks: int) -> str:
    """The original key of a diffusers AutoencoderKL key."""
    resnet = {"conv_shortcut": "nin_shortcut"}
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}." + _rename_first(m[3], resnet),
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}." + _rename_first(m[3], resnet),
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
            lambda m: f"{m[1]}.mid.attn_1." + _rename_first(m[2], _VAE_ATTENTION),
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}." + _rename_first(m[3], resnet),
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return _rename_first(key, _VAE_FIXED)  # conv_in/out, quant convs: the same names


def write_sd1_checkpoint(folder: Path, out: Path) -> Path:
    """Write a diffusers SD1.x folder's UNet, VAE and text encoder as one original-layout safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")

    attention_up_blocks = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in unet.items():
        tensors[UNET_PREFIX + original_unet_key(key, unet_config["layers_per_block"], attention_up_blocks)] = value
    for key, value in vae.items():
        name = original_vae_key(key, len(vae_config["up_block_types"]))
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        tensors[VAE_PREFIX + name] = value
    for key, value in text.items():
        tensors[TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    if len(tensors) != len(unet) + len(vae) + len(text):
        raise RuntimeError("two weights were given the same original-layout name")
    out = Path(out)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, out, metadata={"format": "pt"})
    return out
