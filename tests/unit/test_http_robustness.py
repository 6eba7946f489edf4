"""Hostile and odd inputs found by fuzzing the HTTP API: each gets a 4xx with the one error body, never a 500."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from app.api.limits import MAX_BODY_BYTES, ROUTE_BODY_LIMITS
from app.provenance.png import MANIFEST_KEYWORD, embed_texts
from app.settings import Settings
from tests.support.errors import assert_error
from tests.support.fakes import answering_app, fake_png

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture()
def client(tmp_path):
    application = answering_app(Settings(data_dir=tmp_path, workers="cpu:1"))
    with TestClient(application, raise_server_exceptions=False) as test_client:
        yield test_client




@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "0001-01-01T00:00:00+14:00"}, "since"),  # was a 500 (OverflowError converting to UTC)
        ({"until": "9999-12-31T23:59:59-14:00"}, "until"),
        ({"since": "2024"}, "since"),  # pydantic would read Unix seconds: 1970-01-01T00:33:44Z
        ({"until": "0.5"}, "until"),
    ],
)
def test_listing_times_out_of_range_or_not_iso_are_422(client, params, param):
    assert_error(client.get("/v1/generations", params=params), 422, "invalid_request", param)


def test_listing_times_with_an_offset_compare_in_utc(client):
    generated = client.post("/v1/generations", json={"prompt": "a", "seed": 1}).json()
    east = timezone(timedelta(hours=5))
    now = datetime.now(UTC)
    later, earlier = (now + timedelta(minutes=30)).astimezone(east), (now - timedelta(minutes=30)).astimezone(east)
    assert client.get("/v1/generations", params={"since": later.isoformat()}).json()["data"] == []
    listed = client.get("/v1/generations", params={"since": earlier.isoformat()}).json()["data"]
    assert [g["id"] for g in listed] == [generated["id"]]


@pytest.mark.parametrize("raw", [b'{"prompt": "\xff\xfe"}', b'{"prompt": ' + DEEP + b"}"])
def test_undecodable_generation_body_is_400_malformed_request(client, raw):
    # FastAPI's own 400 used to come out as type `http_error`
    response = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_request")


@pytest.mark.parametrize(
    "raw", [DEEP, b'{"id": "gen_00000000", "a": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}']
)
def test_verify_refuses_deep_or_non_standard_json_with_400(client, raw):
    # deep nesting was a 500 (RecursionError); NaN passed, then broke canonical JSON for a known id
    response = client.post("/v1/verify", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_request", "body")


def test_verify_a_known_id_with_nan_is_400_not_500(client):
    generated = client.post("/v1/generations", json={"prompt": "a", "seed": 1}).json()
    raw = json.dumps({**generated["manifest"], "extra": float("nan")}).encode()
    assert_error(client.post("/v1/verify", content=raw), 400, "malformed_request", "body")


@pytest.mark.parametrize("embedded", ["[" * 100_000 + "]" * 100_000, '{"id": "gen_00000000", "a": NaN}'])
def test_verify_png_with_a_deep_or_nan_manifest_is_422(client, embedded):
    png, _ = fake_png(8, 8, "x")
    doctored = embed_texts(png, {MANIFEST_KEYWORD: embedded}, compressed=frozenset({MANIFEST_KEYWORD}))
    response = client.post("/v1/verify", content=doctored, headers={"content-type": "image/png"})
    assert "not valid JSON" in assert_error(response, 422, "invalid_request", "body")


def test_oversized_generation_body_is_413_before_it_is_read(client):
    limit = ROUTE_BODY_LIMITS["/v1/generations"]
    big = json.dumps({"prompt": "x" * limit}).encode()
    response = client.post("/v1/generations", content=big, headers={"content-type": "application/json"})
    assert "1 MiB" in assert_error(response, 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit applies as the body streams in
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    response = client.post("/v1/generations", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large")
    assert client.post("/v1/generations", json={"prompt": "x" * 20_000, "seed": 1}).status_code == 200


def test_other_routes_keep_the_64_mib_limit(client):
    response = client.put(
        "/v1/consistency/baselines",
        content=b" " * (MAX_BODY_BYTES + 1),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "payload_too_large")
    assert client.post("/v1/verify", json={"id": "gen_00000000"}).status_code == 200


def test_openapi_documents_every_generation_error_status(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/generations"]["post"]["responses"]
    assert {"409", "413", "422", "429", "503"} <= set(responses)


GOOD_BASELINE = {
    "case": "pndm-default",
    "suite_version": 1,
    "model": "sameseed-tiny",
    "reproducibility_key": "rk1-" + "a" * 64,
    "latent_sha256": "b" * 64,
    "pixel_sha256": "c" * 64,
    "recorded_at": "2026-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("junk", "param"),
    [
        ({"case": ""}, "baselines.0.case"),
        ({"case": "../../etc"}, "baselines.0.case"),
        ({"suite_version": False}, "baselines.0.suite_version"),  # was stored as version 0
        ({"suite_version": 0}, "baselines.0.suite_version"),
        ({"model": ""}, "baselines.0.model"),
    ],
)
def test_importing_junk_baselines_is_422_and_stores_nothing(client, junk, param):
    document = {"format": "sameseed.baselines/1", "baselines": [{**GOOD_BASELINE, **junk}]}
    assert_error(client.put("/v1/consistency/baselines", json=document), 422, "invalid_request", param)
    assert client.get("/v1/consistency/baselines").json()["baselines"] == []
    good = {"format": "sameseed.baselines/1", "baselines": [GOOD_BASELINE]}
    assert client.put("/v1/consistency/baselines", json=good).json() == {"imported": 1, "replaced_all": False}
