"""Provenance anyone can check, on the real server: plain diffusers replays every sampler from the manifest
alone, and the README's Python snippets (hashes, replay, signature, C2PA) run as written."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest

from app.pipeline.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[2]


def restore(o):
    """What a client writes (the README's hook): `{"$float": spelling}` back to the float."""
    return float(o["$float"]) if o.keys() == {"$float"} else o


@pytest.fixture(scope="module")
def plain_pipeline():
    """One plain diffusers pipeline per model folder, loaded once for every sampler."""
    loaded = {}

    def get(source):
        from diffusers import StableDiffusionPipeline

        if source not in loaded:
            loaded[source] = StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
            loaded[source].set_progress_bar_config(disable=True)
        return loaded[source]

    return get


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_plain_diffusers_given_only_the_manifest_reproduces_the_latent_hash(server, plain_pipeline, sampler):
    import diffusers
    import torch

    body = server.generate(seed=31, sampler=sampler, steps=3)
    text = json.dumps(body["manifest"])  # all a client keeps: the manifest as JSON text
    if sampler.startswith("dpmpp"):
        assert '"lambda_min_clipped": {"$float": "-Infinity"}' in text  # was null in format 1
    m = json.loads(text, object_hook=restore)
    image, request = m["images"][0], m["request"]
    torch.set_num_threads(m["runtime"]["torch_threads"])
    pipe = plain_pipeline(m["model"]["source"])
    pipe.scheduler = getattr(diffusers, m["scheduler"]["class_name"]).from_config(m["scheduler"]["config"])
    latents = pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"],
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        width=image["width"],
        height=image["height"],
        generator=torch.Generator("cpu").manual_seed(image["seed"]),
        output_type="latent",
    ).images
    digest = hashlib.sha256(latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
    assert digest == image["latent_sha256"]


def test_readme_python_snippets_run_as_written(server, tmp_path, monkeypatch, capsys):
    from app.provenance.c2pa import DIGITAL_SOURCE_TYPE

    body = server.generate(seed=8, sampler="dpmpp_2m", steps=4)  # a sampler whose config holds -inf
    (tmp_path / "image-0.png").write_bytes(base64.b64decode(body["images"][0]["png_base64"]))
    (tmp_path / "keys.json").write_text(server.client.get("/v1/keys").text)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    printed = []
    for block in blocks:  # the front doors' snippets talk to the README's address: here, the test server's
        block = block.replace("http://127.0.0.1:8000", server.url)
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README is ours
        printed.append(capsys.readouterr().out.split())
    key_id = body["manifest"]["signature"]["key_id"]
    assert printed[:4] == [
        [body["images"][0]["pixel_sha256"]],
        ["True"],
        ["signature", "valid,", "key", key_id],
        ["Valid", DIGITAL_SOURCE_TYPE],
    ]
    # the OpenAI and A1111 snippets: seeds 1234 and 1235 with the native route's pixel hashes
    native = server.generate(prompt="a photo of a cat", seed=1234, num_images=2, sampler="euler_a")
    pixels = [image["pixel_sha256"] for image in native["images"]]
    seed_0, _, pixel_0, seed_1, _, pixel_1 = printed[4]
    assert (seed_0, pixel_0, seed_1, pixel_1) == ("1234", pixels[0], "1235", pixels[1])
    assert " ".join(printed[5]) == f"[1234, 1235] ['{pixels[0]}', '{pixels[1]}']"
    assert len(printed) == 6
