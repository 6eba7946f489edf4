"""POST /v1/reproduce against a fake pool: replays judge bits, and junk is a 4xx, never a 500."""

import base64
import copy
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.provenance.png import embed_texts
from app.settings import Settings
from tests.support.fakes import answering_app


@pytest.fixture()
def client(tmp_path):
    settings = Settings(data_dir=tmp_path, workers="cpu:1")
    application = answering_app(settings)
    with TestClient(application) as test_client:
        yield test_client


@pytest.fixture()
def made(client):
    response = client.post("/v1/generations", json={"prompt": "a cat", "seed": 9, "num_images": 2})
    assert response.status_code == 200
    return response.json()


def test_a_manifest_replays_identical_and_an_edited_hash_does_not(client, made):
    verdict = client.post("/v1/reproduce", json=made["manifest"]).json()
    assert verdict["verdict"] == "identical"
    edited = copy.deepcopy(made["manifest"])
    edited["images"][1]["latent_sha256"] = "0" * 64
    verdict = client.post("/v1/reproduce", json=edited).json()
    assert verdict["verdict"] == "different" and [i["latent_match"] for i in verdict["images"]] == [True, False]
    assert verdict["signature"]["signature_valid"] is False


def test_a_generation_id_replays_with_pixel_and_latent_drift_from_the_ledger(client, made):
    verdict = client.post("/v1/reproduce", json={"generation_id": made["id"]}).json()
    assert verdict["source"] == "ledger" and verdict["images"][0]["pixel_drift"]["max_abs"] == 0


def _with(manifest, path, value):
    changed = copy.deepcopy(manifest)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "param"),
    [
        (("request", "prompt"), "", "manifest.request.prompt"),
        (("request", "seed"), -1, "manifest.request.seed"),
        (("request", "steps"), 0, "manifest.request.steps"),
        (("request", "num_images"), 9, "manifest.images"),
        (("request", "sampler"), "warp", "manifest.request.sampler"),
        (("images",), [], "manifest.images"),
        (("runtime",), "x", "manifest"),
    ],
)
def test_a_manifest_that_cannot_be_replayed_is_422_naming_the_field(client, made, path, value, param):
    response = client.post("/v1/reproduce", json=_with(made["manifest"], path, value))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def png_with_manifest(text: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return embed_texts(buffer.getvalue(), {"sameseed.manifest": text})


@pytest.mark.parametrize(
    "body",
    [
        png_with_manifest("{not json"),
        png_with_manifest('{"a": NaN}'),
        png_with_manifest("[" * 100_000),
        png_with_manifest("[1, 2]"),
        b'{"a": NaN}',
        b"[" * 100_000,
    ],
)
def test_junk_replay_bodies_are_4xx(client, body):
    response = client.post("/v1/reproduce", content=body)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"type", "message", "param"}


def test_a_png_with_corrupt_pixels_but_a_valid_manifest_is_422(client, made):
    png = base64.b64decode(made["images"][0]["png_base64"])
    start = png.index(b"IDAT") + 8
    corrupt = png[:start] + bytes(len(png) - start - 20) + png[-20:]
    response = client.post("/v1/reproduce", content=corrupt)
    assert 400 <= response.status_code < 500, response.text


def test_a_manifest_image_index_that_is_not_an_integer_does_not_crash(client, made):
    png = base64.b64decode(made["images"][0]["png_base64"])
    from app.provenance.png import read_texts

    manifest = json.loads(read_texts(png)["sameseed.manifest"])
    manifest["images"][0]["index"] = "zero"
    response = client.post("/v1/reproduce", content=png_with_manifest(json.dumps(manifest)))
    assert response.status_code == 422, response.text
