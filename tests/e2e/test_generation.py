"""End to end on the real server: bitwise repeatability, seeds, batches, hashes, samplers, errors."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy
import pytest
from PIL import Image

from app.pipeline.samplers import SAMPLERS


def hashes(body):
    return [(i["latent_sha256"], i["pixel_sha256"]) for i in body["images"]]


def rgb(image):
    return Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).convert("RGB").tobytes()


def test_same_request_twice_gives_the_same_bits(server):
    first = server.generate(seed=1234)
    second = server.generate(seed=1234)
    assert hashes(first) == hashes(second)
    # the PNG bytes differ (each embeds its own signed manifest); the pixels do not
    assert rgb(first["images"][0]) == rgb(second["images"][0])
    assert first["id"] != second["id"]
    assert first["manifest"]["runtime"]["reproducibility_key"] == second["manifest"]["runtime"]["reproducibility_key"]


def test_the_http_process_never_loads_torch(server):
    """Only the workers hold torch: the server process that answers HTTP stays small, even after it read the
    workers' reports and images."""
    server.generate(seed=7)
    maps = (Path("/proc") / str(server.process.pid) / "maps").read_text()
    assert "libtorch" not in maps
    workers = [w["pid"] for w in server.client.get("/readyz").json()["workers"]]
    assert all("libtorch" in (Path("/proc") / str(pid) / "maps").read_text() for pid in workers)


def test_next_seed_gives_a_different_image(server):
    a, b = server.generate(seed=1234), server.generate(seed=1235)
    assert a["images"][0]["latent_sha256"] != b["images"][0]["latent_sha256"]
    assert a["images"][0]["pixel_sha256"] != b["images"][0]["pixel_sha256"]


def test_three_image_request_equals_three_single_requests(server):
    batch = server.generate(seed=500, num_images=3, sampler="euler_a")
    singles = [server.generate(seed=500 + k, sampler="euler_a") for k in range(3)]
    assert [i["seed"] for i in batch["images"]] == [500, 501, 502]
    assert hashes(batch) == [hashes(s)[0] for s in singles]


def test_pixel_hash_recomputes_from_the_returned_png(server):
    body = server.generate(seed=77)
    image = body["images"][0]
    pixels = numpy.asarray(
        Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).convert("RGB"), dtype=numpy.uint8
    )
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == image["pixel_sha256"]
    assert pixels.shape == (64, 64, 3)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_repeats_bitwise(server, sampler):
    a = server.generate(seed=42, sampler=sampler, steps=8)
    b = server.generate(seed=42, sampler=sampler, steps=8)
    assert hashes(a) == hashes(b)
    assert a["manifest"]["scheduler"]["class_name"] == SAMPLERS[sampler].scheduler_class


def test_samplers_give_different_images(server):
    latents = {
        server.generate(seed=42, sampler=s, steps=8)["images"][0]["latent_sha256"] for s in ("euler", "ddim", "pndm")
    }
    assert len(latents) == 3


def test_manifest_records_model_files_runtime_and_effective_request(server, registry):
    body = server.generate(seed=3)
    manifest = body["manifest"]
    assert manifest["model"]["files"] == registry.get("sameseed-tiny").sha256
    assert manifest["model"]["pipeline"] == "StableDiffusionPipeline"
    runtime = manifest["runtime"]
    assert runtime["torch_threads"] == 1 and runtime["deterministic_algorithms"] is True
    assert runtime["reproducibility_key"].startswith("rk1-") and runtime["noise_device"] == "cpu"
    assert runtime["versions"]["torch"].startswith("2.13.0")
    assert manifest["request"]["sampler"] == "pndm" and manifest["warnings"] == []
    ready = server.client.get("/readyz").json()
    assert ready["workers"][0]["models"]["sameseed-tiny"] == runtime["reproducibility_key"]


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_tokens(server):
    from transformers import CLIPTokenizer

    prompt = " ".join(["cat"] * 90) + " zebra"
    body = server.generate(seed=1, prompt=prompt)
    tokenizer = CLIPTokenizer.from_pretrained(body["manifest"]["model"]["source"], subfolder="tokenizer")
    dropped = len(tokenizer(prompt).input_ids) - 77
    assert dropped > 0
    (warning,) = body["manifest"]["warnings"]
    assert warning["code"] == "prompt_truncated" and warning["param"] == "prompt"
    assert f"the last {dropped} were dropped" in warning["message"] and "zebra" in warning["message"]
    short = server.generate(seed=1, prompt="cat " * 10)
    assert short["manifest"]["warnings"] == []


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": "a", "seed": -5}, 422, "seed"),
        ({"prompt": "a", "seed": 2**53}, 422, "seed"),
        ({"prompt": "a", "steps": 0}, 422, "steps"),
        ({"prompt": "a", "steps": 10_000}, 422, "steps"),
        ({"prompt": "a", "width": 63}, 422, "width"),
        ({"prompt": "a", "height": 8000}, 422, "height"),
        ({"prompt": "a", "guidance_scale": "high"}, 422, "guidance_scale"),
        ({"prompt": "a", "sampler": "euler_b"}, 422, "sampler"),
        ({"prompt": "a", "num_images": 0}, 422, "num_images"),
        ({"prompt": "a", "num_images": 9}, 422, "num_images"),
        ({"prompt": "a", "hires_fix": True}, 422, "hires_fix"),
        ({"negative_prompt": "a"}, 422, "prompt"),
        ({"prompt": "a", "model": "stable-diffusion-9"}, 404, "model"),
    ],
)
def test_bad_inputs_get_4xx_with_the_error_body(server, payload, status, param):
    response = server.client.post("/v1/generations", json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_malformed_json_is_400_not_500(server):
    response = server.client.post(
        "/v1/generations", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "malformed_request"
