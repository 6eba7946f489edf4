"""The HTTP layer against a fake pool: status codes, the one error body, and response shapes."""

import base64

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.support.errors import assert_error
from tests.support.fakes import FakePool, answering_app


@pytest.fixture()
def client(tmp_path):
    settings = Settings(data_dir=tmp_path, workers="cpu:1")
    application = answering_app(settings)
    with TestClient(application) as test_client:
        yield test_client




def test_generation_returns_images_hashes_and_a_manifest(client):
    response = client.post("/v1/generations", json={"prompt": "a cat", "seed": 7, "num_images": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("gen_") and body["manifest"]["id"] == body["id"]
    assert [(i["index"], i["seed"]) for i in body["images"]] == [(0, 7), (1, 8)]
    assert base64.b64decode(body["images"][0]["png_base64"]).startswith(b"\x89PNG")
    manifest = body["manifest"]
    assert manifest["format"] == "sameseed.manifest/2"
    assert manifest["request"] == {
        "model": "sameseed-tiny",
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 7,
        "steps": 20,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "sampler": "pndm",
        "num_images": 2,
    }
    assert manifest["images"][1]["latent_sha256"] == body["images"][1]["latent_sha256"]
    assert set(manifest["timestamps"]) == {"received", "started", "finished"}


def test_drawn_seed_is_returned(client):
    body = client.post("/v1/generations", json={"prompt": "a cat"}).json()
    assert (
        isinstance(body["images"][0]["seed"], int) and body["manifest"]["request"]["seed"] == body["images"][0]["seed"]
    )


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**53}, "seed"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": "20"}, "steps"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "width": 65}, "width"),
        ({"prompt": "a", "height": 4096}, "height"),
        ({"prompt": "a", "sampler": "k_lms"}, "sampler"),
        ({"prompt": "a", "num_images": 9}, "num_images"),
        ({"prompt": "a", "cfg": 7}, "cfg"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "steps": 151}, "steps"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(client, payload, param):
    assert_error(client.post("/v1/generations", json=payload), 422, "invalid_request", param)


def test_unknown_model_is_404(client):
    message = assert_error(
        client.post("/v1/generations", json={"prompt": "a", "model": "sdxl"}), 404, "model_not_found", "model"
    )
    assert "sameseed-tiny" in message


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "a",}', b'{"prompt": "a" "seed": 1}'])
def test_malformed_json_is_400(client, raw):
    response = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_request")


def test_a_json_array_body_is_422(client):
    assert_error(client.post("/v1/generations", json=["prompt"]), 422, "invalid_request")


def test_an_empty_body_is_422_saying_a_body_is_required(client):
    response = client.post("/v1/generations", content=b"", headers={"content-type": "application/json"})
    assert "body is required" in assert_error(response, 422, "invalid_request")


def test_unknown_route_and_wrong_method_use_the_error_body(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/generations"), 405, "method_not_allowed")


def test_health_ready_models_samplers(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"][0]["state"] == "ready"
    models = client.get("/v1/models").json()
    assert models["default_model"] == "sameseed-tiny"
    assert {m["id"] for m in models["models"]} >= {"sameseed-tiny", "sameseed-bench"}
    names = {s["name"] for s in client.get("/v1/samplers").json()["samplers"]}
    assert {"euler", "euler_a", "ddim", "dpmpp_2m", "pndm"} <= names
    assert "/v1/generations" in client.get("/openapi.json").json()["paths"]


def test_readyz_is_503_while_no_worker_is_ready(tmp_path):
    settings = Settings(data_dir=tmp_path, workers="cpu:2")
    application = create_app(settings, pool_factory=lambda configs: FakePool(configs))
    with TestClient(application) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert [w["state"] for w in response.json()["workers"]] == ["starting", "starting"]


def test_health_and_readiness_answer_head_for_load_balancers(client):
    assert client.head("/healthz").status_code == 200
    ready = client.head("/readyz")
    assert ready.status_code == 200 and ready.content == b""
