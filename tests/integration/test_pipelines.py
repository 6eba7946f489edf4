"""Model families in process: SD1.x single-file checkpoints, SDXL, per-model dtype, the fp16 VAE guard."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy
import pytest
import torch

from app.errors import ModelUnavailable
from app.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, original_unet_key, write_sd1_checkpoint
from app.models.registry import EMBEDDED_CONFIGS, RegistryError, load_registry
from app.params import GenerationParams
from app.pipeline.families import FAMILIES
from app.pipeline.generate import decode_latents, render_image, token_warnings
from app.pipeline.loader import load_model, resolve_paths, verify_files
from app.provenance.hashes import file_sha256
from app.provenance.key import reproducibility_key
from tests.support.fakes import RUNTIME
from tests.support.model_variants import TINY, TINY_XL, write_hot_vae, write_single_file

CAT = GenerationParams("sameseed-tiny", "a photo of a cat", "", 7, 10, 7.5, 64, 64, "pndm", 1)
XL_CAT = GenerationParams("sameseed-tiny-xl", "a photo of a cat", "", 7, 10, 5.0, 64, 64, "euler", 1)

VARIANTS = """
version: 1
default_model: folder
models:
  - {{id: folder, family: sd1, source: {{local: {tiny}}}, defaults: {{width: 64, height: 64}}}}
  - id: single
    family: sd1
    source: {{single_file: single/sameseed-tiny.safetensors, config: single/sameseed-tiny-config}}
    defaults: {{width: 64, height: 64}}
  - {{id: xl32, family: sdxl, source: {{local: {xl}}}, defaults: {{width: 64, height: 64}}}}
  - {{id: xl16, family: sdxl, source: {{local: {xl}}}, dtype: float16, defaults: {{width: 64, height: 64}}}}
  - {{id: xlbf16, family: sdxl, source: {{local: {xl}}}, dtype: bfloat16, defaults: {{width: 64, height: 64}}}}
  - id: xl16-hot
    family: sdxl
    source: {{local: {xl}}}
    vae: {{local: hot-vae}}
    dtype: float16
    defaults: {{width: 64, height: 64}}
"""


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    write_single_file(root / "single")
    write_hot_vae(root / "hot-vae")
    (root / "registry.yaml").write_text(VARIANTS.format(tiny=TINY, xl=TINY_XL))
    return load_registry(root / "registry.yaml")


@pytest.fixture(scope="module")
def models(variants, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    loaded = {}

    def get(model_id):
        if model_id not in loaded:
            entry = variants.get(model_id)
            loaded[model_id] = load_model(entry, resolve_paths(entry, variants, data_dir, False), "cpu")
        return loaded[model_id]

    return get


def key(model):
    identity = model.identity()
    return reproducibility_key(
        files=identity["files"], pipeline=identity["pipeline"], dtype=identity["dtype"], runtime=RUNTIME
    )


# ------------------------------------------------------------------ SD1.x single-file checkpoints


def test_single_file_checkpoint_gives_the_same_latents_and_pixels_as_its_folder(models, variants):
    folder, single = models("folder"), models("single")
    a, b = render_image(folder, CAT), render_image(single, CAT)
    assert (a.latent_sha256, a.pixel_sha256) == (b.latent_sha256, b.pixel_sha256)
    identity = single.identity()
    assert identity["source_kind"] == "single_file" and identity["pipeline"] == "StableDiffusionPipeline"
    checkpoint = variants.local_folder(variants.get("single"), variants.base_dir)
    assert identity["source"] == str(checkpoint)
    assert identity["config_source"] == str(variants.base_dir / "single" / "sameseed-tiny-config")
    # the checkpoint itself and every config file it loaded with are in the identity, so in the key
    configs = {p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file() and p.suffix != ".safetensors"}
    assert identity["files"] == {
        "sameseed-tiny.safetensors": file_sha256(checkpoint),
        **{f"config/{rel}": file_sha256(TINY / rel) for rel in configs},
    }
    assert key(single) != key(folder)


def test_written_checkpoint_uses_the_original_layout_and_converts_back_exactly(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    tensors = load_file(write_sd1_checkpoint(TINY, tmp_path / "tiny.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "cond_stage_model"}
    assert tensors[VAE_PREFIX + "decoder.mid.attn_1.q.weight"].dim() == 4  # a 1x1 conv, as the original
    for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        original = load_file(TINY / part / "diffusion_pytorch_model.safetensors")
        config = read_json(TINY / part / "config.json")
        convert = convert_ldm_unet_checkpoint if part == "unet" else convert_ldm_vae_checkpoint
        back = convert(tensors, config)
        assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
        assert any(k.startswith(prefix) for k in tensors)
    text = load_file(TINY / "text_encoder" / "model.safetensors")
    assert all(torch.equal(tensors[TEXT_PREFIX + k], v) for k, v in text.items())


def read_json(path):
    return json.loads(path.read_text())


def test_shipped_sd15_config_matches_real_sd15_checkpoints():
    """SD1.5 at full size on the meta device, named as an original checkpoint: diffusers reads it as "v1"."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    config = EMBEDDED_CONFIGS / "sd15"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
    attention_up = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    layout = {
        UNET_PREFIX + original_unet_key(k, unet.config.layers_per_block, attention_up): v
        for k, v in unet.state_dict().items()
    }
    assert len(layout) == 686  # the UNet tensors of every SD1.x checkpoint
    assert infer_diffusers_model_type(layout) == "v1"
    assert convert_ldm_unet_checkpoint(layout, unet.config).keys() == unet.state_dict().keys()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD1.5's VAE


def test_single_file_missing_a_tensor_is_refused_not_filled_at_random(tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint, config = write_single_file(tmp_path)
    tensors = load_file(checkpoint)
    del tensors[UNET_PREFIX + "out.2.bias"]
    save_file(tensors, checkpoint)
    (tmp_path / "registry.yaml").write_text(
        "version: 1\ndefault_model: m\nmodels:\n  - {id: m, family: sd1, defaults: {width: 64, height: 64},"
        f" source: {{single_file: {checkpoint.name}, config: {config.name}}}}}\n"
    )
    registry = load_registry(tmp_path / "registry.yaml")
    entry = registry.get("m")
    with pytest.raises(ModelUnavailable, match=r"lacks 1 unet tensors \(e.g. conv_out.bias\)"):
        load_model(entry, resolve_paths(entry, registry, tmp_path, False), "cpu")


# ------------------------------------------------------------------ SDXL


def test_sdxl_records_size_and_crop_conditioning_and_repeats(models):
    model = models("xl32")
    a, b = render_image(model, XL_CAT), render_image(model, XL_CAT)
    assert (a.latent_sha256, a.pixel_sha256) == (b.latent_sha256, b.pixel_sha256)
    assert type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    assert a.conditioning == {
        "original_size": [64, 64],
        "crops_coords_top_left": [0, 0],
        "target_size": [64, 64],
        "negative_original_size": [64, 64],
        "negative_crops_coords_top_left": [0, 0],
        "negative_target_size": [64, 64],
        "zero_negative_prompt": True,
    }
    negative = render_image(model, replace(XL_CAT, negative_prompt="blurry"))
    assert negative.conditioning["zero_negative_prompt"] is False
    assert negative.latent_sha256 != a.latent_sha256


def test_sdxl_conditioning_is_uncropped_at_the_image_size_and_sd1_has_none():
    sdxl = FAMILIES["sdxl"]
    zeros = {"force_zeros_for_empty_prompt": True}
    wide = sdxl.conditioning(width=96, height=64, negative_prompt="", pipe_config=zeros)
    assert wide.call_kwargs() == {"original_size": (64, 96), "crops_coords_top_left": (0, 0), "target_size": (64, 96)}
    assert wide.zero_negative_prompt
    config = {"force_zeros_for_empty_prompt": False}
    assert not sdxl.conditioning(width=64, height=64, negative_prompt="", pipe_config=config).zero_negative_prompt
    assert FAMILIES["sd1"].conditioning(width=64, height=64, negative_prompt="", pipe_config={}) is None


def test_sdxl_truncation_is_warned_once_for_its_two_tokenizers(models):
    model = models("xl32")
    params = replace(XL_CAT, prompt=" ".join(["cat"] * 90) + " zebra")
    (warning,) = token_warnings(model, params)
    assert warning["code"] == "prompt_truncated" and "zebra" in warning["message"]


def test_dtype_comes_from_the_registry_is_recorded_and_enters_the_key(models):
    fp32, fp16, bf16 = models("xl32"), models("xl16"), models("xlbf16")
    assert [m.identity()["dtype"] for m in (fp32, fp16, bf16)] == ["float32", "float16", "bfloat16"]
    assert (fp16.pipe.unet.dtype, bf16.pipe.text_encoder_2.dtype) == (torch.float16, torch.bfloat16)
    assert len({key(fp32), key(fp16), key(bf16)}) == 3
    runs = [render_image(bf16, XL_CAT).latent_sha256 for _ in range(2)]
    assert runs[0] == runs[1] != render_image(fp32, XL_CAT).latent_sha256


# ------------------------------------------------------------------ fp16 VAE guard


class NanInHalfVae(torch.nn.Module):
    """A VAE stand-in whose float16 decode gives NaN (as SDXL's VAE does) and float32 decode does not."""

    def __init__(self, dtype):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.config = SimpleNamespace(scaling_factor=0.5)
        self.decoded_in = []

    @property
    def dtype(self):
        return self.gain.dtype

    def decode(self, latents, return_dict=False):
        self.decoded_in.append(latents.dtype)
        pixels = (latents[:, :3] * self.gain).clone()
        if latents.dtype == torch.float16:
            pixels[0, 0, 0, 0] = float("nan")
        return (pixels,)


def test_nan_on_the_first_decode_decodes_the_same_latents_again_in_float32():
    vae = NanInHalfVae(torch.float16)
    latents = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8).half()
    before = latents.clone()
    decoded = decode_latents(vae, latents)
    assert decoded.upcast and decoded.vae_dtype == "float16"
    assert vae.decoded_in == [torch.float16, torch.float32]
    assert torch.equal(decoded.pixels, latents[:, :3].float() / 0.5)
    assert vae.dtype == torch.float16  # the VAE is back in its own dtype for the next image
    assert torch.equal(latents, before)  # the latents (and so latent_sha256) are untouched


def test_finite_decode_is_not_upcast_and_nan_in_float32_fails_the_image():
    latents = torch.ones(1, 4, 8, 8)
    fine = decode_latents(NanInHalfVae(torch.float32), latents)
    assert not fine.upcast and fine.vae_dtype == "float32"

    class NanAlways(NanInHalfVae):
        def decode(self, latents, return_dict=False):
            return (torch.full_like(latents[:, :3], float("nan")),)

    with pytest.raises(FloatingPointError, match="NaN/Inf in float32"):
        decode_latents(NanAlways(torch.float32), latents)
    with pytest.raises(FloatingPointError, match="again in float32"):
        decode_latents(NanAlways(torch.float16), latents.half())


def test_fp16_vae_overflow_is_decoded_in_float32_with_the_latents_untouched(models):
    plain, hot = models("xl16"), models("xl16-hot")
    a, b = render_image(plain, XL_CAT), render_image(hot, XL_CAT)
    assert (a.vae_upcast, b.vae_upcast) == (False, True)
    assert a.latent_sha256 == b.latent_sha256 and a.pixel_sha256 != b.pixel_sha256
    (warning,) = b.warnings
    assert warning["code"] == "vae_upcast" and "float16" in warning["message"] and "seed 7" in warning["message"]
    assert hot.pipe.vae.dtype == torch.float16
    assert render_image(hot, XL_CAT).pixel_sha256 == b.pixel_sha256  # the round trip to float32 left no trace
    assert len(numpy.unique(numpy.asarray(b.image))) > 16  # real pixels, not a black or NaN image


def test_replacement_vae_is_hashed_under_vae_override_and_changes_the_key(models, variants):
    plain, hot = models("xl16"), models("xl16-hot")
    hot_vae = variants.base_dir / "hot-vae"
    files = hot.identity()["files"]
    assert {k: v for k, v in files.items() if k.startswith("vae_override/")} == {
        f"vae_override/{name}": file_sha256(hot_vae / name)
        for name in ("config.json", "diffusion_pytorch_model.safetensors")
    }
    assert hot.identity()["vae_source"] == str(hot_vae) and plain.identity()["vae_source"] is None
    assert key(hot) != key(plain)


def test_a_wrong_pin_on_the_replacement_vae_refuses_to_load(variants, tmp_path):
    entry = variants.get("xl16-hot").model_copy(
        update={"sha256": {"vae_override/diffusion_pytorch_model.safetensors": "0" * 64}}
    )
    with pytest.raises(ModelUnavailable, match="vae_override/diffusion_pytorch_model.safetensors"):
        verify_files(entry, resolve_paths(entry, variants, tmp_path, False))


# ------------------------------------------------------------------ registry

REGISTRY = """
version: 1
default_model: m
models:
  - id: m
    family: {family}
    source: {source}
    defaults: {{width: 64, height: 64}}
"""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("family", "source", "message"),
    [
        ("sd1", "{single_file: a.safetensors, local: b}", "exactly one of local, hub, build, single_file"),
        ("sd1", "{single_file: v1-5-pruned-emaonly.ckpt}", "must be .safetensors"),
        ("sd1", f"{{hub: {{repo: o/m, revision: {COMMIT}, filename: model.ckpt}}}}", "must be .safetensors"),
        ("sd1", "{local: folder, config: configs}", "only for single-file"),
        ("sdxl", "{single_file: sd_xl_base_1.0.safetensors}", "register a sdxl model as a diffusers folder"),
        ("sd2", "{local: folder}", "family"),
    ],
)
def test_registry_refuses_bad_family_sources(registry_file, family, source, message):
    with pytest.raises(RegistryError, match=message):
        load_registry(registry_file(REGISTRY.format(family=family, source=source)))


def test_registry_single_files_default_to_the_shipped_sd15_config(registry_file, tmp_path):
    registry = load_registry(registry_file(REGISTRY.format(family="sd1", source="{single_file: ck/v1-5.safetensors}")))
    entry = registry.models[0]
    assert entry.source.kind == "single_file" and entry.pipeline_class == "StableDiffusionPipeline"
    assert registry.local_folder(entry, tmp_path / "data") == tmp_path / "ck" / "v1-5.safetensors"
    assert registry.config_folder(entry) == EMBEDDED_CONFIGS / "sd15"
    hub = f"{{hub: {{repo: o/m, revision: {COMMIT}, filename: v1-5.safetensors}}, config: mine}}"
    entry = load_registry(registry_file(REGISTRY.format(family="sd1", source=hub))).models[0]
    assert entry.source.kind == "hub" and entry.source.is_single_file
    xl = load_registry(registry_file(REGISTRY.format(family="sdxl", source="{local: xl}")))
    assert xl.models[0].pipeline_class == "StableDiffusionXLPipeline" and xl.config_folder(xl.models[0]) is None


def test_registry_replacement_vae_needs_exactly_one_source(registry_file):
    text = REGISTRY.format(family="sdxl", source="{local: xl}") + "    vae: VAE\n"
    with pytest.raises(RegistryError, match="vae needs exactly one of local, hub"):
        load_registry(registry_file(text.replace("VAE", "{}")))
    fix = f"{{hub: {{repo: madebyollin/sdxl-vae-fp16-fix, revision: {COMMIT}}}}}"
    entry = load_registry(registry_file(text.replace("VAE", fix))).models[0]
    assert entry.vae.hub.repo == "madebyollin/sdxl-vae-fp16-fix"
