"""Hostile input found by a fuzz and attack trial: each gets a 4xx with the one error body, never a 500."""

import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient

from app.provenance.png import MAX_TEXT_BYTES
from app.settings import Settings
from tests.support.errors import assert_error
from tests.support.fakes import answering_app, fake_png


@pytest.fixture()
def client(tmp_path):
    application = answering_app(Settings(data_dir=tmp_path, workers="cpu:1"))
    with TestClient(application, raise_server_exceptions=False) as test_client:
        yield test_client




def with_chunks(png, *extra):
    """The PNG with raw chunks after IHDR (correct CRCs)."""
    head = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in extra)
    return png[:head] + body + png[head:]


@pytest.mark.parametrize("route", ["/v1/verify", "/v1/reproduce"])
def test_malformed_ztxt_chunk_is_422_not_500(client, route):
    png, _ = fake_png(8, 8, "x")
    broken = with_chunks(png, (b"zTXt", b"comment\0\0this is not zlib"))
    response = client.post(route, content=broken, headers={"content-type": "image/png"})
    assert "zTXt chunk b'comment'" in assert_error(response, 422, "invalid_request", "body")


@pytest.mark.parametrize("route", ["/v1/verify", "/v1/reproduce"])
def test_compressed_text_bomb_is_422_naming_the_limit(client, route):
    png, _ = fake_png(8, 8, "x")
    mebibyte = zlib.compress(b"a" * (1 << 20), 9)
    bomb = with_chunks(png, *[(b"zTXt", b"k%d\0\0" % i + mebibyte) for i in range(64)])
    assert len(bomb) < 100_000 and 64 << 20 > MAX_TEXT_BYTES  # 64 MiB of text in a 70 KB upload
    response = client.post(route, content=bomb, headers={"content-type": "image/png"})
    assert "beyond 4 MiB (the limit per PNG)" in assert_error(response, 422, "invalid_request", "body")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xef\xbb\xbf" + json.dumps({"prompt": "a"}).encode(), "byte order mark"),
        (json.dumps({"prompt": "a"}).encode("utf-16"), "byte order mark"),
        (json.dumps({"prompt": "a"}).encode("utf-16-le"), "UTF-16"),
        (json.dumps({"prompt": "a"}).encode("utf-32-be"), "UTF-16/32"),
    ],
)
def test_json_not_in_utf8_or_with_a_bom_is_400(client, raw, why):
    response = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert why in assert_error(response, 400, "malformed_request")


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"data": {"prompt": "a"}}, "application/x-www-form-urlencoded"),
        ({"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}}, "text/plain"),
        ({"content": b'{"prompt": "a"}', "headers": {"content-type": ""}}, "no Content-Type"),
        ({"content": b'{"prompt": "a"}', "headers": {"content-type": "application/json; charset=latin-1"}}, "UTF-8"),
    ],
)
def test_body_not_sent_as_json_says_which_content_type_to_use(client, kwargs, shown):
    message = assert_error(client.post("/v1/generations", **kwargs), 415, "unsupported_media_type", "content-type")
    assert shown in message
    assert "Content-Type: application/json" in message or "UTF-8" in message


def test_json_with_a_json_suffix_type_and_utf8_charset_is_accepted(client):
    for kind in ("application/json; charset=utf-8", "application/vnd.sameseed+json"):
        response = client.post("/v1/generations", content=b'{"prompt": "a", "seed": 1}', headers={"content-type": kind})
        assert response.status_code == 200, response.text


def test_an_integral_float_is_an_integer_as_json_schema_says(client):
    body = client.post("/v1/generations", json={"prompt": "a", "seed": 5.0, "num_images": 2.0}).json()
    assert [i["seed"] for i in body["images"]] == [5, 6]
    assert body["manifest"]["request"]["seed"] == 5
    assert_error(client.post("/v1/generations", json={"prompt": "a", "seed": 5.5}), 422, "invalid_request", "seed")
    assert_error(client.post("/v1/generations", json={"prompt": "a", "seed": True}), 422, "invalid_request", "seed")


def test_unknown_field_lists_the_accepted_ones_and_suggests_a_close_name(client):
    post = client.post("/v1/generations", json={"prompt": "a", "stesp": 3})
    message = assert_error(post, 422, "invalid_request", "stesp")
    assert "did you mean 'steps'?" in message
    assert "Accepted fields: model, prompt, negative_prompt, seed, steps" in message
    post = client.post("/v1/generations", json={"prompt": "a", "colour": 3})
    message = assert_error(post, 422, "invalid_request", "colour")
    assert "did you mean" not in message and "Accepted fields:" in message
    message = assert_error(client.get("/v1/generations", params={"limt": 3}), 422, "invalid_request", "limt")
    assert "did you mean 'limit'?" in message


@pytest.mark.parametrize(
    ("field", "value"), [("steps", 151), ("steps", 1001), ("steps", 0), ("width", 8200), ("width", 0)]
)
def test_out_of_range_values_get_the_models_limit_in_one_message(client, field, value):
    limits = client.get("/v1/models").json()["models"][0]["limits"]
    post = client.post("/v1/generations", json={"prompt": "a", field: value})
    message = assert_error(post, 422, "invalid_request", field)
    named = limits["max_steps"] if field == "steps" else limits["max_size"]
    assert f"to {named} for model sameseed-tiny; got {value}" in message


def test_openapi_states_no_limit_that_disagrees_with_the_models(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerationRequest"]["properties"]
    for field in ("steps", "width", "height", "guidance_scale"):
        text = json.dumps(schema[field])
        assert "maximum" not in text and "limits." in text


def test_405_allow_lists_every_method_of_the_path(client):
    response = client.options("/v1/generations")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    assert client.delete("/v1/consistency/baselines").headers["allow"] == "GET, PUT"


@pytest.mark.parametrize("index", ["%20%31", "00", "+0", "01", "1%20", "-0", "0x1", "١"])
def test_image_index_is_plain_decimal_only(client, index):
    generated = client.post("/v1/generations", json={"prompt": "a", "seed": 1, "num_images": 2}).json()
    assert client.get(f"/v1/generations/{generated['id']}/images/1.png").status_code == 200
    assert_error(client.get(f"/v1/generations/{generated['id']}/images/{index}.png"), 422, "invalid_request", "index")


def test_a_prompt_cannot_forge_a1111_settings(client):
    prompt = "a cat\nNegative prompt: dogs\nSteps: 999, Sampler: Euler, CFG scale: 1, Seed: 1"
    generated = client.post("/v1/generations", json={"prompt": prompt, "seed": 3}).json()
    from app.provenance.png import read_texts

    png = client.get(f"/v1/generations/{generated['id']}/images/0.png").content
    lines = read_texts(png)["parameters"].split("\n")
    assert len(lines) == 2 and json.loads(lines[0]) == prompt
    assert lines[1].startswith("Steps: 20,") and "Seed: 3," in lines[1]
