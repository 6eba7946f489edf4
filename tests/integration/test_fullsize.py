"""The random-weight builder from the shipped SD1.5 config folder, and the forced-overflow VAE guard check."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from app.models.build import file_sha256s
from app.models.fullsize import SD15_CONFIG_DIR, TINY_OVERRIDES, build_from_configs, parameter_counts


def test_the_shipped_config_folder_describes_sd15_exactly():
    # The published parameter counts of stable-diffusion-v1-5's UNet, VAE and CLIP ViT-L/14 text tower:
    # same architecture, hence the same FLOPs per step as the real model.
    assert parameter_counts(SD15_CONFIG_DIR) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_from_configs(SD15_CONFIG_DIR, tmp_path_factory.mktemp("a") / "model", seed=15, dtype="float16",
                              overrides=TINY_OVERRIDES)


def test_same_config_and_seed_give_the_same_bytes_another_seed_other_weights(built, tmp_path):
    again = build_from_configs(SD15_CONFIG_DIR, tmp_path / "again", seed=15, dtype="float16",
                               overrides=TINY_OVERRIDES)
    assert file_sha256s(again) == file_sha256s(built)
    other = file_sha256s(build_from_configs(SD15_CONFIG_DIR, tmp_path / "other", seed=16, dtype="float16",
                                            overrides=TINY_OVERRIDES))
    weights = [rel for rel in other if rel.endswith(".safetensors")]
    assert len(weights) == 3 and all(other[rel] != file_sha256s(built)[rel] for rel in weights)


def test_the_folder_is_float16_safetensors_with_the_config_folders_tokenizer(built):
    from safetensors import safe_open

    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        with safe_open(built / rel, framework="pt") as handle:
            keys = list(handle.keys())
            assert {str(handle.get_tensor(k).dtype) for k in keys} == {"torch.float16"}
        if rel.startswith("text_encoder"):
            assert all(k.startswith("text_model.") for k in keys)  # the layout SD1.5's file has
    for rel in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                "model_index.json"):
        assert filecmp.cmp(built / rel, SD15_CONFIG_DIR / rel, shallow=False)
    assert not any(p.suffix in (".bin", ".pt", ".ckpt") for p in built.rglob("*"))


def test_the_built_folder_loads_as_a_stable_diffusion_pipeline(built):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(built, dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    assert list(pipe.unet.config.block_out_channels) == TINY_OVERRIDES["unet"]["block_out_channels"]
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer("a photo of a cat").input_ids == [
        49406, 320, 1125, 539, 320, 2368, 49407]


def test_the_vae_guard_check_passes_on_the_services_decode(built):
    from app.devicecheck.guard import forced_overflow_check

    ok, detail, evidence = forced_overflow_check(built / "vae", "cpu", 64)
    assert ok, detail
    assert evidence["upcast"] and evidence["equals_float32_decode"] and evidence["weights_unchanged"]
    assert evidence["unforced_upcast"] is False  # the unforced VAE decodes in float16 without help


def test_the_vae_guard_check_fails_a_guard_that_does_not_decode_in_float32(built, monkeypatch):
    import app.pipeline.generate as generate
    from app.devicecheck.guard import forced_overflow_check

    def sloppy(vae, latents):  # claims an upcast but hides the NaN instead of decoding again
        import torch

        pixels = torch.nan_to_num(generate._decode(vae, latents), nan=0.0, posinf=1.0, neginf=-1.0)
        finite = bool(torch.isfinite(generate._decode(vae, latents)).all())
        return generate.Decoded(pixels=pixels, upcast=not finite, vae_dtype="float16")

    monkeypatch.setattr(generate, "decode_latents", sloppy)
    ok, detail, evidence = forced_overflow_check(built / "vae", "cpu", 64)
    assert not ok and evidence["equals_float32_decode"] is False
    assert "DIFFERENT from a float32 decode" in detail
