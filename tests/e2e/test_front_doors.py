"""End to end on the real server: the `openai` SDK and `webuiapi` get the native bits for the same parameters."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy
import openai
import webuiapi
from PIL import Image


def pixel_sha256(png: bytes) -> str:
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.uint8)
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def test_openai_sdk_images_equal_the_native_route(server):
    native = server.generate(seed=4242, num_images=2, sampler="euler_a", steps=8)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        result = client.images.generate(
            model="sameseed-tiny",
            prompt="a photo of a cat",
            n=2,
            size="64x64",
            response_format="b64_json",
            extra_body={"seed": 4242, "sampler": "euler_a", "steps": 8},
        )
    pngs = [base64.b64decode(image.b64_json) for image in result.data]
    assert [pixel_sha256(png) for png in pngs] == [image["pixel_sha256"] for image in native["images"]]
    data = result.model_dump()["data"]
    assert [(i["latent_sha256"], i["pixel_sha256"]) for i in data] == [
        (i["latent_sha256"], i["pixel_sha256"]) for i in native["images"]
    ]
    manifest = result.model_dump()["manifest"]
    assert manifest["runtime"]["reproducibility_key"] == native["manifest"]["runtime"]["reproducibility_key"]


def test_webuiapi_txt2img_equals_the_native_route_and_its_info_parses(server):
    native = server.generate(seed=4243, num_images=2, sampler="euler", steps=8, guidance_scale=6.0)
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
    result = api.txt2img(
        prompt="a photo of a cat",
        seed=4243,
        batch_size=2,
        steps=8,
        cfg_scale=6.0,
        width=64,
        height=64,
        sampler_name="Euler",
    )
    assert [hashlib.sha256(numpy.asarray(i.convert("RGB")).tobytes()).hexdigest() for i in result.images] == [
        image["pixel_sha256"] for image in native["images"]
    ]
    assert result.info["all_seeds"] == [4243, 4244] and len(result.info["infotexts"]) == 2
    assert [i["latent_sha256"] for i in result.info["sameseed"]["images"]] == [
        i["latent_sha256"] for i in native["images"]
    ]
