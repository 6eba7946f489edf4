"""End to end: the tiny SDXL model, an fp16 model whose VAE overflows, and an SD1 single-file checkpoint."""

from __future__ import annotations

import hashlib

import pytest

from tests.e2e.conftest import Server
from tests.support.model_variants import TINY, TINY_XL, write_hot_vae, write_single_file

XL = "sameseed-tiny-xl"


def hashes(body):
    return [(i["latent_sha256"], i["pixel_sha256"]) for i in body["images"]]


def test_tiny_xl_serves_and_repeats_bitwise(server, registry):
    first = server.generate(model=XL, seed=11)
    second = server.generate(model=XL, seed=11)
    assert hashes(first) == hashes(second)
    manifest = first["manifest"]
    assert manifest["runtime"]["reproducibility_key"] == second["manifest"]["runtime"]["reproducibility_key"]
    model = manifest["model"]
    assert (model["family"], model["pipeline"], model["dtype"]) == ("sdxl", "StableDiffusionXLPipeline", "float32")
    assert model["files"] == registry.get(XL).sha256
    assert manifest["request"]["sampler"] == "euler" and manifest["request"]["guidance_scale"] == 5.0
    assert manifest["conditioning"] == {
        "original_size": [64, 64],
        "crops_coords_top_left": [0, 0],
        "target_size": [64, 64],
        "negative_original_size": [64, 64],
        "negative_crops_coords_top_left": [0, 0],
        "negative_target_size": [64, 64],
        "zero_negative_prompt": True,
    }
    assert manifest["images"][0]["vae_upcast"] is False and manifest["warnings"] == []
    sd1 = server.generate(seed=11)["manifest"]
    assert sd1["conditioning"] is None and sd1["images"][0]["vae_upcast"] is False


def test_plain_diffusers_reproduces_the_tiny_xl_latents(server):
    """SDXL replay: the manifest's folder, scheduler, seed and conditioning give the same latents."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    body = server.generate(model=XL, seed=5, steps=8, width=64, height=48)
    manifest = body["manifest"]
    torch.set_num_threads(manifest["runtime"]["torch_threads"])
    pipe = StableDiffusionXLPipeline.from_pretrained(manifest["model"]["source"], add_watermarker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(manifest["scheduler"]["config"])
    request, conditioning = manifest["request"], manifest["conditioning"]
    assert conditioning["zero_negative_prompt"]  # so no negative prompt: diffusers' own zeros
    latents = pipe(
        request["prompt"],
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        width=request["width"],
        height=request["height"],
        original_size=tuple(conditioning["original_size"]),
        crops_coords_top_left=tuple(conditioning["crops_coords_top_left"]),
        target_size=tuple(conditioning["target_size"]),
        generator=torch.Generator("cpu").manual_seed(request["seed"]),
        output_type="latent",
    ).images
    digest = hashlib.sha256(latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
    assert digest == body["images"][0]["latent_sha256"]
    assert conditioning["original_size"] == [48, 64]  # (height, width), SDXL's order


VARIANTS = """
version: 1
default_model: folder
models:
  - {{id: folder, family: sd1, source: {{local: {tiny}}}, defaults: {{width: 64, height: 64}}}}
  - id: single
    family: sd1
    source: {{single_file: single/sameseed-tiny.safetensors, config: single/sameseed-tiny-config}}
    defaults: {{width: 64, height: 64}}
  - id: xl16
    family: sdxl
    source: {{local: {xl}}}
    dtype: float16
    defaults: {{width: 64, height: 64, guidance_scale: 5.0, sampler: euler}}
  - id: xl16-hot
    family: sdxl
    source: {{local: {xl}}}
    vae: {{local: hot-vae}}
    dtype: float16
    defaults: {{width: 64, height: 64, guidance_scale: 5.0, sampler: euler}}
"""


@pytest.fixture(scope="module")
def variants_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    write_single_file(root / "single")
    write_hot_vae(root / "hot-vae")
    (root / "registry.yaml").write_text(VARIANTS.format(tiny=TINY, xl=TINY_XL))
    srv = Server(root / "server", SAMESEED_MODELS=str(root / "registry.yaml")).start()
    yield srv
    srv.stop()


def test_fp16_vae_overflow_is_decoded_in_float32_recorded_and_warned(variants_server):
    plain = variants_server.generate(model="xl16", seed=21, num_images=2)
    hot = variants_server.generate(model="xl16-hot", seed=21, num_images=2)
    assert [i["vae_upcast"] for i in plain["manifest"]["images"]] == [False, False]
    assert [i["vae_upcast"] for i in hot["manifest"]["images"]] == [True, True]
    # only the decode changed: same latents, other pixels
    assert [h[0] for h in hashes(hot)] == [h[0] for h in hashes(plain)]
    assert all(a[1] != b[1] for a, b in zip(hashes(hot), hashes(plain), strict=True))
    warnings = hot["manifest"]["warnings"]
    assert [w["code"] for w in warnings] == ["vae_upcast", "vae_upcast"] and plain["manifest"]["warnings"] == []
    assert "seed 21" in warnings[0]["message"] and "seed 22" in warnings[1]["message"]
    model = hot["manifest"]["model"]
    assert model["dtype"] == "float16" and model["vae_source"].endswith("hot-vae")
    assert {"vae_override/config.json", "vae_override/diffusion_pytorch_model.safetensors"} <= set(model["files"])
    keys = {b["manifest"]["runtime"]["reproducibility_key"] for b in (plain, hot)}
    assert len(keys) == 2
    assert hashes(variants_server.generate(model="xl16-hot", seed=21, num_images=2)) == hashes(hot)
    metrics = variants_server.client.get("/metrics").text
    assert 'sameseed_vae_upcasts_total{model="xl16-hot"} 4.0' in metrics
    assert 'sameseed_vae_upcasts_total{model="xl16"} 0.0' in metrics  # exists at zero: increase() sees a first one


def test_single_file_checkpoint_serves_the_same_bits_as_its_folder(variants_server):
    folder = variants_server.generate(model="folder", seed=8, sampler="dpmpp_2m")
    single = variants_server.generate(model="single", seed=8, sampler="dpmpp_2m")
    assert hashes(single) == hashes(folder)
    model = single["manifest"]["model"]
    assert model["source_kind"] == "single_file" and model["source"].endswith("sameseed-tiny.safetensors")
    assert model["config_source"].endswith("sameseed-tiny-config")
    assert "sameseed-tiny.safetensors" in model["files"] and "config/unet/config.json" in model["files"]
    assert single["manifest"]["runtime"]["reproducibility_key"] != folder["manifest"]["runtime"]["reproducibility_key"]
