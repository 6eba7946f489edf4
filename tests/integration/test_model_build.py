"""Unit tests of the deterministic model builder and the committed tiny model."""

import json
from pathlib import Path

import pytest
import torch

from app.models import build
from app.models.build import (
    MODEL_SPECS,
    PIPELINE_FILES,
    build_clip_tokenizer_files,
    build_model,
    file_sha256s,
    fill_deterministic_weights,
)

COMMITTED_TINY = Path(build.__file__).resolve().parent / "sameseed-tiny"
TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def test_committed_tiny_model_equals_a_fresh_build(tmp_path):
    fresh = build_model("sameseed-tiny", tmp_path / "sameseed-tiny")
    assert fresh == tmp_path / "sameseed-tiny"
    committed = file_sha256s(COMMITTED_TINY)
    assert list(committed) == sorted(PIPELINE_FILES)
    assert file_sha256s(fresh) == committed
    # no temporary build folders are left next to the result
    assert [p.name for p in tmp_path.iterdir()] == ["sameseed-tiny"]


def test_committed_tiny_model_is_small_and_safetensors_only():
    files = [p for p in COMMITTED_TINY.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 450_000


def test_full_vocab_tokenizer_encodes_like_sd15(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer_files(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == TOKENIZER_FILES
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert len(tok) == 49408
    padded = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70
    # transformers 4's slow tokenizer skips line 0 of merges.txt: it must be the header
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[:2] == ["#version: 0.2", "i n"]


def test_vocabulary_order_is_bytes_then_word_ends_then_merges(tmp_path):
    build_clip_tokenizer_files(tmp_path, 1000)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    ids = sorted(vocab.values())
    assert ids == list(range(1000))
    by_id = {i: t for t, i in vocab.items()}
    assert by_id[0] == "!" and by_id[255] == chr(256 + 67)  # 68 non-printable bytes shifted past U+00FF
    assert by_id[256] == "!</w>" and by_id[320] == "a</w>"
    assert by_id[512] == "in" and by_id[513] == "th"  # the first two merges
    assert (by_id[998], by_id[999]) == ("<|startoftext|>", "<|endoftext|>")


def test_tiny_vocab_tokenizer_ids(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer_files(tmp_path, 1000)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("a photo of a cat").input_ids
    assert len(tok) == 1000
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (998, 999, 999)
    assert ids[0] == 998 and ids[-1] == 999 and max(ids) <= 999
    with pytest.raises(ValueError):
        build_clip_tokenizer_files(tmp_path / "bad", 100)


def test_text_encoder_weights_use_sd15_key_prefix():
    from safetensors import safe_open

    with safe_open(COMMITTED_TINY / "text_encoder" / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_fill_deterministic_weights_rules():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 9), torch.nn.LayerNorm(9))
    count = fill_deterministic_weights(model, seed=7)
    assert count == 5
    emb, lin, norm = model
    assert emb.weight.abs().max() <= 0.02 * 3**0.5
    assert lin.weight.abs().max() <= 0.5 and lin.bias.abs().max() <= 0.5
    assert torch.equal(norm.weight, torch.ones(9)) and torch.equal(norm.bias, torch.zeros(9))
    before = [p.detach().clone() for p in model.parameters()]
    fill_deterministic_weights(model, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    fill_deterministic_weights(model, seed=8)
    assert not torch.equal(before[0], emb.weight)
    with pytest.raises(ValueError, match="no deterministic init rule"):
        fill_deterministic_weights(torch.nn.PReLU(), seed=0)


def test_build_model_refuses_to_replace_a_foreign_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_model("sameseed-tiny", target)
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(KeyError):
        build_model("no-such-model", tmp_path / "x")


def test_file_sha256s_is_sorted_relative_posix(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes(b"abc")
    assert file_sha256s(tmp_path) == {
        "a.txt": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "b/z.txt": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    }


COMMITTED_TINY_XL = Path(build.__file__).resolve().parent / "sameseed-tiny-xl"
COMMITTED_SD15_CONFIG = Path(build.__file__).resolve().parent / "configs" / "sd15"


def test_committed_tiny_xl_model_equals_a_fresh_build_and_is_small(tmp_path):
    fresh = build_model("sameseed-tiny-xl", tmp_path / "sameseed-tiny-xl")
    committed = file_sha256s(COMMITTED_TINY_XL)
    assert list(committed) == sorted(build.XL_PIPELINE_FILES)
    assert file_sha256s(fresh) == committed
    assert sum(p.stat().st_size for p in COMMITTED_TINY_XL.rglob("*") if p.is_file()) < 400_000


def test_tiny_xl_has_sdxl_layout():
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    pipe = StableDiffusionXLPipeline.from_pretrained(COMMITTED_TINY_XL, use_safetensors=True, add_watermarker=False)
    spec = MODEL_SPECS["sameseed-tiny-xl"]
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    first, second = pipe.text_encoder.config, pipe.text_encoder_2.config
    # the UNet reads both encoders side by side, plus the pooled projection and six size/crop numbers
    assert pipe.unet.config.cross_attention_dim == first.hidden_size + second.hidden_size
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.projection_class_embeddings_input_dim == second.projection_dim + 6 * 8
    assert pipe.config.force_zeros_for_empty_prompt is True and pipe.vae.config.scaling_factor == 0.13025
    # SDXL's second tokenizer pads with "!" (id 0); both share the 1,000-token CLIP vocabulary
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id, second.pad_token_id) == (999, 0, 0)
    assert pipe.tokenizer("a photo of a cat").input_ids == pipe.tokenizer_2("a photo of a cat").input_ids
    assert spec.vae_scale_factor == pipe.vae_scale_factor == 2
    with safe_open(COMMITTED_TINY_XL / "text_encoder_2" / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    projection = {"text_projection.weight"}
    assert projection <= keys and all(k.startswith("text_model.") for k in keys - projection)


def test_committed_sd15_config_equals_a_fresh_build(tmp_path):
    from app.models.checkpoint import SD15_CONFIG_FILES, build_sd15_config

    fresh = build_sd15_config(tmp_path / "sd15")
    committed = file_sha256s(COMMITTED_SD15_CONFIG)
    assert list(committed) == sorted(SD15_CONFIG_FILES)
    assert file_sha256s(fresh) == committed
    assert not [p for p in COMMITTED_SD15_CONFIG.rglob("*.safetensors")]  # configs only, no weights
