"""Deterministic builders for Sameseed's random-weight SD1.5- and SDXL-architecture pipelines.

The weights are random but byte-stable: every module is first built from its config under
``torch.manual_seed(0)`` and then every parameter is overwritten with values drawn from a
platform-independent numpy ``PCG64`` stream (uniform doubles only, no libm), so the saved
safetensors files have the same sha256 on every machine, CPU instruction set and run.
The tokenizer is OpenAI's real CLIP BPE, rebuilt offline from the merges committed in
``clip_bpe/``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

CLIP_BPE_DIR = Path(__file__).resolve().parent / "clip_bpe"
CLIP_MERGES_FILE = CLIP_BPE_DIR / "bpe_simple_vocab_16e6_merges_48894.txt.gz"
# sha256 of the decompressed merges text (48,894 lines, each ending in "\n").
CLIP_MERGES_SHA256 = "d308b7377a8ceaa9707a21614fe8c831b9196e197b7aeb69833359362907af02"
CLIP_NUM_MERGES = 48_894
CLIP_BYTE_TOKENS = 256
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_FULL_VOCAB_SIZE = 2 * CLIP_BYTE_TOKENS + CLIP_NUM_MERGES + 2  # 49,408
CLIP_MIN_VOCAB_SIZE = 2 * CLIP_BYTE_TOKENS + 2  # bytes, bytes + "</w>", bos, eos
MODEL_MAX_LENGTH = 77
TEXT_MODEL_PREFIX = "text_model."  # key prefix of SD1.5's text_encoder/model.safetensors
EMBEDDING_BOUND = 0.02 * math.sqrt(3.0)  # uniform with std 0.02

# The scheduler of runwayml/stable-diffusion-v1-5 (PNDM, PLMS steps only).
SD15_PNDM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

# The scheduler of stabilityai/stable-diffusion-xl-base-1.0 (Euler, "leading" spacing).
SDXL_EULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_VAE_SCALING_FACTOR = 0.13025
SDXL_PAD_TOKEN = "!"  # SDXL's second tokenizer pads with "!" (id 0), not <|endoftext|>

# Every file of a built pipeline folder; anything else (e.g. a pickled .bin) fails the build.
PIPELINE_FILES: tuple[str, ...] = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
XL_PIPELINE_FILES: tuple[str, ...] = (
    *PIPELINE_FILES,
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
)

# Files under these sub-folders are written by this module, not re-serialised.
_OWN_JSON_DIRS = ("tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and default generation size of one embedded random-weight pipeline."""

    model_id: str
    description: str
    unet_block_out_channels: tuple[int, ...]
    unet_down_block_types: tuple[str, ...]
    unet_up_block_types: tuple[str, ...]
    unet_layers_per_block: int
    unet_norm_num_groups: int
    unet_attention_head_dim: int
    cross_attention_dim: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    text_hidden_size: int
    text_intermediate_size: int
    text_num_hidden_layers: int
    text_num_attention_heads: int
    vocab_size: int | None  # None: the full CLIP vocabulary (49,408 tokens)
    default_size: int  # default image height and width in pixels
    seed: int  # seeds the weight streams (one per component)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side, as diffusers computes it."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def tokenizer_vocab_size(self) -> int:
        """Number of tokens in the tokenizer and the text encoder's embedding table."""
        return CLIP_FULL_VOCAB_SIZE if self.vocab_size is None else self.vocab_size

    @property
    def bos_token_id(self) -> int:
        """Id of ``<|startoftext|>`` (second-to-last token)."""
        return self.tokenizer_vocab_size - 2

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (last token; also the pad and unk token)."""
        return self.tokenizer_vocab_size - 1

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of the built pipeline folder."""
        return PIPELINE_FILES


@dataclass(frozen=True)
class XLModelSpec(ModelSpec):
    """An SDXL-architecture pipeline: a second (projecting) text encoder and size/crop conditioning.

    As in SDXL, the UNet reads both encoders' penultimate hidden states side by side
    (``cross_attention_dim`` = the two widths added) and the second encoder's pooled, projected
    output plus six size/crop numbers through its ``text_time`` embedding.
    """

    unet_transformer_layers_per_block: int
    unet_addition_time_embed_dim: int
    text_2_hidden_size: int
    text_2_intermediate_size: int
    text_2_num_hidden_layers: int
    text_2_num_attention_heads: int

    def __post_init__(self) -> None:
        if self.cross_attention_dim != self.text_hidden_size + self.text_2_hidden_size:
            raise ValueError("an SDXL cross_attention_dim is the sum of the two text encoder widths")

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of the built pipeline folder."""
        return XL_PIPELINE_FILES


MODEL_SPECS: dict[str, ModelSpec] = {
    "sameseed-tiny": ModelSpec(
        model_id="sameseed-tiny",
        description="diffusers-test-size SD1.5 architecture, random weights, 64x64 default",
        unet_block_out_channels=(4, 8),
        unet_down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        unet_up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        unet_layers_per_block=1,
        unet_norm_num_groups=2,
        unet_attention_head_dim=8,
        cross_attention_dim=32,
        vae_block_out_channels=(4, 8),
        vae_layers_per_block=1,
        vae_norm_num_groups=2,
        text_hidden_size=32,
        text_intermediate_size=64,
        text_num_hidden_layers=2,
        text_num_attention_heads=4,
        vocab_size=1000,
        default_size=64,
        seed=1,
    ),
    "sameseed-bench": ModelSpec(
        model_id="sameseed-bench",
        description="benchmark-size SD1.5 architecture (VAE scale 8), random weights",
        unet_block_out_channels=(32, 64, 64),
        unet_down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers_per_block=2,
        unet_norm_num_groups=32,
        unet_attention_head_dim=8,
        cross_attention_dim=32,
        vae_block_out_channels=(32, 32, 64, 64),
        vae_layers_per_block=1,
        vae_norm_num_groups=32,
        text_hidden_size=32,
        text_intermediate_size=64,
        text_num_hidden_layers=2,
        text_num_attention_heads=4,
        vocab_size=None,
        default_size=128,
        seed=2,
    ),
    "sameseed-tiny-xl": XLModelSpec(
        model_id="sameseed-tiny-xl",
        description="tiny SDXL architecture (two text encoders, size/crop conditioning), random weights, 64x64",
        unet_block_out_channels=(4, 8),
        unet_down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        unet_up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        unet_layers_per_block=1,
        unet_norm_num_groups=2,
        unet_attention_head_dim=2,
        cross_attention_dim=24,
        vae_block_out_channels=(4, 8),
        vae_layers_per_block=1,
        vae_norm_num_groups=2,
        text_hidden_size=8,
        text_intermediate_size=16,
        text_num_hidden_layers=2,
        text_num_attention_heads=2,
        vocab_size=1000,
        default_size=64,
        seed=3,
        unet_transformer_layers_per_block=1,
        unet_addition_time_embed_dim=8,
        text_2_hidden_size=16,
        text_2_intermediate_size=32,
        text_2_num_hidden_layers=2,
        text_2_num_attention_heads=2,
    ),
}


# --------------------------------------------------------------------------- tokenizer


def load_clip_merges(count: int | None = None) -> list[str]:
    """Return the first ``count`` (default all 48,894) CLIP BPE merges, verified by sha256."""
    raw = gzip.decompress(CLIP_MERGES_FILE.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CLIP_MERGES_SHA256:
        raise ValueError(f"{CLIP_MERGES_FILE.name}: decompressed sha256 {digest} is not the expected one")
    merges = raw.decode("utf-8").split("\n")[:-1]
    if count is None:
        return merges
    if not 0 <= count <= len(merges):
        raise ValueError(f"merge count {count} outside 0..{len(merges)}")
    return merges[:count]


def clip_byte_chars() -> list[str]:
    """Return the 256 byte-level characters in the GPT-2/CLIP byte-to-unicode order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    kept = set(printable)
    # Bytes that are not printable are shifted past U+00FF, in byte order.
    shifted = [chr(256 + i) for i, _ in enumerate(b for b in range(256) if b not in kept)]
    return [chr(b) for b in printable] + shifted


def clip_vocab(merges: list[str]) -> list[str]:
    """Return the CLIP vocabulary (tokens in id order) that the given merges produce."""
    chars = clip_byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges), BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise ValueError("CLIP vocabulary has duplicate tokens")
    return tokens


def _merge_count(vocab_size: int | None) -> int:
    """Return how many merges give a vocabulary of ``vocab_size`` tokens (None: all)."""
    if vocab_size is None:
        return CLIP_NUM_MERGES
    if not CLIP_MIN_VOCAB_SIZE <= vocab_size <= CLIP_FULL_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} outside {CLIP_MIN_VOCAB_SIZE}..{CLIP_FULL_VOCAB_SIZE}")
    return vocab_size - CLIP_MIN_VOCAB_SIZE


def write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as canonical JSON (sorted keys, UTF-8, trailing newline)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    path.write_bytes((text + "\n").encode("utf-8"))


def build_clip_tokenizer_files(out_dir: Path, vocab_size: int | None, *, pad_token: str = EOS_TOKEN) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer and special-token configs)."""
    merges = load_clip_merges(_merge_count(vocab_size))
    tokens = clip_vocab(merges)
    bos_id, eos_id = len(tokens) - 2, len(tokens) - 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kept in id order (not key-sorted) so the file reads like OpenAI's/HF's vocab.json.
    vocab_text = json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False)
    (out_dir / "vocab.json").write_bytes((vocab_text + "\n").encode("utf-8"))
    # transformers 4's slow CLIPTokenizer drops the first line: it must be the version header.
    (out_dir / "merges.txt").write_bytes(("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode("utf-8"))

    def added(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(bos_id): added(BOS_TOKEN), str(eos_id): added(EOS_TOKEN)},
            "bos_token": BOS_TOKEN,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": EOS_TOKEN,
            "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": EOS_TOKEN,
        },
    )
    write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN},
    )


# --------------------------------------------------------------------------- weights

_NORM_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
)
_AFFINE_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.ConvTranspose2d,
)


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor]]:
    """Yield (full name, owning module, attribute, tensor) for parameters and floating buffers."""
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for attr, param in mod.named_parameters(recurse=False):
            yield prefix + attr, mod, attr, param
        for attr, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                yield prefix + attr, mod, attr, buf


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """Draw float32 values uniform in [-bound, bound) from float64 bits only."""
    count = math.prod(shape)
    values = rng.random(count)  # float64 from integer bits: identical on every platform
    values = values * (2.0 * bound) - bound
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def fill_deterministic_weights(module: torch.nn.Module, seed: int) -> int:
    """Overwrite every parameter/floating buffer from a PCG64 stream; return the count set."""
    rng = np.random.Generator(np.random.PCG64(seed))
    seen: dict[int, str] = {}
    entries = sorted(_named_tensors(module), key=lambda e: e[0])
    with torch.no_grad():
        for name, owner, attr, tensor in entries:
            if id(tensor) in seen:  # tied tensor: already set under another name
                continue
            seen[id(tensor)] = name
            shape = tuple(tensor.shape)
            if isinstance(owner, _NORM_TYPES) and attr in ("weight", "bias"):
                tensor.fill_(1.0 if attr == "weight" else 0.0)
            elif isinstance(owner, _NORM_TYPES) and attr in ("running_mean", "running_var"):
                tensor.fill_(0.0 if attr == "running_mean" else 1.0)
            elif isinstance(owner, torch.nn.Embedding) and attr == "weight":
                tensor.copy_(_uniform(rng, shape, EMBEDDING_BOUND))
            elif isinstance(owner, _AFFINE_TYPES) and attr in ("weight", "bias"):
                weight = owner.weight
                fan_in = math.prod(weight.shape[1:])
                tensor.copy_(_uniform(rng, shape, 1.0 / math.sqrt(fan_in)))
            else:
                raise ValueError(f"no deterministic init rule for {name} ({type(owner).__name__}.{attr})")
    return len(seen)


# --------------------------------------------------------------------------- components


def _unet_config(spec: ModelSpec) -> dict[str, Any]:
    """Return the UNet2DConditionModel constructor arguments for ``spec``."""
    return {
        "sample_size": spec.default_size // spec.vae_scale_factor,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": spec.unet_down_block_types,
        "up_block_types": spec.unet_up_block_types,
        "block_out_channels": spec.unet_block_out_channels,
        "layers_per_block": spec.unet_layers_per_block,
        "norm_num_groups": spec.unet_norm_num_groups,
        "attention_head_dim": spec.unet_attention_head_dim,
        "cross_attention_dim": spec.cross_attention_dim,
    }


def _xl_unet_config(spec: XLModelSpec) -> dict[str, Any]:
    """Return the UNet2DConditionModel arguments of an SDXL-architecture ``spec``."""
    return {
        **_unet_config(spec),
        "use_linear_projection": True,
        "transformer_layers_per_block": spec.unet_transformer_layers_per_block,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": spec.unet_addition_time_embed_dim,
        # pooled text embedding + (original size, crop top-left, target size), each number embedded
        "projection_class_embeddings_input_dim": spec.text_2_hidden_size + 6 * spec.unet_addition_time_embed_dim,
    }


def _vae_config(spec: ModelSpec) -> dict[str, Any]:
    """Return the AutoencoderKL constructor arguments for ``spec``."""
    levels = len(spec.vae_block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": spec.vae_block_out_channels,
        "layers_per_block": spec.vae_layers_per_block,
        "latent_channels": 4,
        "norm_num_groups": spec.vae_norm_num_groups,
        "sample_size": spec.default_size,
        "scaling_factor": SDXL_VAE_SCALING_FACTOR if isinstance(spec, XLModelSpec) else 0.18215,
    }


def _text_config(spec: ModelSpec) -> dict[str, Any]:
    """Return the CLIPTextConfig arguments for ``spec`` (ids consistent with the tokenizer)."""
    return {
        "vocab_size": spec.tokenizer_vocab_size,
        "hidden_size": spec.text_hidden_size,
        "intermediate_size": spec.text_intermediate_size,
        "num_hidden_layers": spec.text_num_hidden_layers,
        "num_attention_heads": spec.text_num_attention_heads,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.eos_token_id,
        "projection_dim": spec.cross_attention_dim,
    }


def _xl_text_configs(spec: XLModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the CLIPTextConfig arguments of SDXL's two text encoders (CLIP-L-like, then OpenCLIP-G-like)."""
    first = {**_text_config(spec), "projection_dim": spec.text_hidden_size}
    second = {
        **first,
        "hidden_size": spec.text_2_hidden_size,
        "intermediate_size": spec.text_2_intermediate_size,
        "num_hidden_layers": spec.text_2_num_hidden_layers,
        "num_attention_heads": spec.text_2_num_attention_heads,
        "hidden_act": "gelu",
        "pad_token_id": clip_vocab([]).index(SDXL_PAD_TOKEN),
        "projection_dim": spec.text_2_hidden_size,
    }
    return first, second


def _component_seed(spec: ModelSpec, index: int) -> int:
    """Return the weight-stream seed of component ``index`` (0 unet, 1 vae, 2 and 3 text encoders)."""
    return spec.seed * 1000 + index


def _build_pipeline(spec: ModelSpec, tokenizer_dir: Path) -> StableDiffusionPipeline:
    """Build the StableDiffusionPipeline for ``spec`` with deterministic weights in memory."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**_unet_config(spec))
        vae = AutoencoderKL(**_vae_config(spec))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(spec)))
    for index, module in enumerate((unet, vae, text_encoder)):
        fill_deterministic_weights(module, _component_seed(spec, index))
        module.eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer("")["input_ids"] != [spec.bos_token_id, spec.eos_token_id]:
        raise RuntimeError("tokenizer special-token ids do not match the spec")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_PNDM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_xl_pipeline(spec: XLModelSpec, tokenizer_dirs: tuple[Path, Path]) -> StableDiffusionXLPipeline:
    """Build the StableDiffusionXLPipeline for ``spec`` with deterministic weights in memory."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    first, second = _xl_text_configs(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**_xl_unet_config(spec))
        vae = AutoencoderKL(**_vae_config(spec))
        text_encoder = CLIPTextModel(CLIPTextConfig(**first))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**second))
    for index, module in enumerate((unet, vae, text_encoder, text_encoder_2)):
        fill_deterministic_weights(module, _component_seed(spec, index))
        module.eval()
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs)
    for tok in (tokenizer, tokenizer_2):
        if tok("")["input_ids"] != [spec.bos_token_id, spec.eos_token_id]:
            raise RuntimeError("tokenizer special-token ids do not match the spec")
    if tokenizer_2.pad_token_id != second["pad_token_id"]:
        raise RuntimeError("the second tokenizer does not pad with the text encoder's pad token")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _write_tokenizers(spec: ModelSpec, folder: Path) -> None:
    """Write the pipeline's tokenizer folder(s): ``tokenizer`` and, for SDXL, ``tokenizer_2``."""
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name, ignore_errors=True)
    build_clip_tokenizer_files(folder / "tokenizer", spec.vocab_size)
    if isinstance(spec, XLModelSpec):
        build_clip_tokenizer_files(folder / "tokenizer_2", spec.vocab_size, pad_token=SDXL_PAD_TOKEN)


def _add_text_model_prefix(path: Path) -> None:
    """Rewrite a CLIPTextModel safetensors file with SD1.5's ``text_model.`` key prefix.

    transformers 5 saves a from-scratch CLIPTextModel without the prefix, which transformers 4
    would silently skip (leaving random weights); transformers 5 strips the prefix on load.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    renamed = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in tensors.items()}
    if len(renamed) != len(tensors):
        raise RuntimeError(f"{path.name}: key clash while adding the {TEXT_MODEL_PREFIX!r} prefix")
    save_file(renamed, path, metadata={"format": "pt"})


def canonicalize_json_files(folder: Path) -> None:
    """Re-serialise the library-written JSON files with sorted keys and fixed formatting."""
    for path in sorted(folder.rglob("*.json")):
        if path.relative_to(folder).parts[0] in _OWN_JSON_DIRS:
            continue
        write_json(path, json.loads(path.read_text(encoding="utf-8")))


def _check_files(folder: Path, expected: tuple[str, ...]) -> None:
    """Fail unless the folder holds exactly the expected files (safetensors weights, no pickles)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if found != set(expected):
        extra, missing = sorted(found - set(expected)), sorted(set(expected) - found)
        raise RuntimeError(f"unexpected pipeline files: extra {extra}, missing {missing}")


def normalize_modes(folder: Path) -> None:
    """Make the folder tree world-readable (0755 dirs, 0644 files); mkdtemp creates 0700."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _is_replaceable(path: Path) -> bool:
    """Tell whether ``path`` is an empty directory or a diffusers pipeline folder."""
    return path.is_dir() and ((path / "model_index.json").is_file() or not any(path.iterdir()))


def build_model(model_id: str, out_dir: Path) -> Path:
    """Build the pipeline folder for ``model_id`` at ``out_dir`` atomically and return out_dir.

    The folder is written to a temporary sibling and renamed into place. An existing
    pipeline folder (a directory holding ``model_index.json``) or empty directory at
    ``out_dir`` is replaced; any other existing path raises FileExistsError, untouched.
    """
    if model_id not in MODEL_SPECS:
        raise KeyError(f"unknown model id {model_id!r}; known: {sorted(MODEL_SPECS)}")
    spec = MODEL_SPECS[model_id]
    out_dir = Path(out_dir)
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a pipeline folder; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        _write_tokenizers(spec, tmp)
        if isinstance(spec, XLModelSpec):
            pipe: Any = _build_xl_pipeline(spec, (tmp / "tokenizer", tmp / "tokenizer_2"))
        else:
            pipe = _build_pipeline(spec, tmp / "tokenizer")
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; ship the files both 4 and 5 can load.
        _write_tokenizers(spec, tmp)
        # (CLIPTextModelWithProjection, SDXL's second encoder, saves its keys as transformers 4 does.)
        _add_text_model_prefix(tmp / "text_encoder" / "model.safetensors")
        canonicalize_json_files(tmp)
        _check_files(tmp, spec.files)
        normalize_modes(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old / out_dir.name, out_dir)  # put the previous folder back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------- hashes


def file_sha256s(folder: Path) -> dict[str, str]:
    """Return {relative posix path: sha256 hex} for every file under ``folder``, sorted by path."""
    folder = Path(folder)
    result: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        result[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return dict(sorted(result.items()))
