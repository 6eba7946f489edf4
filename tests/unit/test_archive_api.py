"""Ledger, image and verification routes over a fake pool: links, filters, cursors, verify, keys, retention."""

import base64
import io
import json
import time
from datetime import UTC, datetime, timedelta

import numpy
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.provenance.png import MANIFEST_KEYWORD, embed_texts, read_texts
from app.settings import Settings
from tests.support.errors import assert_error
from tests.support.fakes import answering_app


def make_client(tmp_path, **settings):
    application = answering_app(Settings(data_dir=tmp_path, workers="cpu:1", **settings))
    return TestClient(application)


@pytest.fixture()
def client(tmp_path):
    with make_client(tmp_path) as test_client:
        yield test_client


def generate(client, **body):
    response = client.post("/v1/generations", json={"prompt": "a cat", **body})
    assert response.status_code == 200, response.text
    return response.json()




def test_response_png_is_the_stored_png_with_the_signed_manifest_embedded(client):
    body = generate(client, seed=3, num_images=2)
    assert body["manifest"]["signature"]["key_id"] == client.get("/v1/keys").json()["keys"][0]["key_id"]
    for image in body["images"]:
        png = base64.b64decode(image["png_base64"])
        assert image["url"] == f"/v1/generations/{body['id']}/images/{image['index']}.png"
        stored = client.get(image["url"])
        assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
        assert stored.content == png
        assert json.loads(read_texts(png)[MANIFEST_KEYWORD]) == body["manifest"]


def test_url_response_format_omits_base64_and_keeps_the_manifest_request_clean(client):
    body = generate(client, seed=3, response_format="url")
    assert body["images"][0]["png_base64"] is None
    assert "response_format" not in body["manifest"]["request"]
    assert client.get(body["images"][0]["url"]).status_code == 200
    assert_error(
        client.post("/v1/generations", json={"prompt": "a", "response_format": "jpeg"}),
        422,
        "invalid_request",
        "response_format",
    )


def test_get_generation_returns_the_ledger_row_and_the_signed_manifest(client):
    body = generate(client, seed=5)
    record = client.get(f"/v1/generations/{body['id']}").json()
    assert record["manifest"] == body["manifest"]
    assert record["status"] == "stored" and record["model"] == "sameseed-tiny"
    assert record["reproducibility_key"] == body["manifest"]["runtime"]["reproducibility_key"]
    assert [i["pixel_sha256"] for i in record["images"]] == [i["pixel_sha256"] for i in body["images"]]


def test_unknown_generation_or_image_is_404_and_bad_ids_are_422(client):
    body = generate(client)
    assert_error(client.get("/v1/generations/gen_0123456789abcdef"), 404, "generation_not_found", "generation_id")
    assert_error(client.get(f"/v1/generations/{body['id']}/images/1.png"), 404, "generation_not_found", "index")
    assert_error(client.get("/v1/generations/gen_XYZ"), 422, "invalid_request", "generation_id")
    assert_error(client.get(f"/v1/generations/{body['id']}/images/x.png"), 422, "invalid_request", "index")


def test_listing_filters_and_cursor_pagination(client):
    start = datetime.now(UTC)
    bodies = [generate(client, seed=s) for s in (10, 11, 12)]
    listed = client.get("/v1/generations").json()
    assert [g["id"] for g in listed["data"]] == [b["id"] for b in reversed(bodies)]
    assert listed["next_cursor"] is None

    pixel = bodies[1]["images"][0]["pixel_sha256"]
    assert [g["id"] for g in client.get("/v1/generations", params={"pixel_sha256": pixel}).json()["data"]] == [
        bodies[1]["id"]
    ]
    latent = bodies[2]["images"][0]["latent_sha256"]
    assert len(client.get("/v1/generations", params={"latent_sha256": latent}).json()["data"]) == 1
    key = bodies[0]["manifest"]["runtime"]["reproducibility_key"]
    assert len(client.get("/v1/generations", params={"reproducibility_key": key}).json()["data"]) == 3
    other_key = "rk1-" + "0" * 64
    assert client.get("/v1/generations", params={"reproducibility_key": other_key}).json()["data"] == []
    assert client.get("/v1/generations", params={"model": "sameseed-bench"}).json()["data"] == []
    after = (start + timedelta(hours=1)).isoformat()
    assert client.get("/v1/generations", params={"since": after}).json()["data"] == []
    assert len(client.get("/v1/generations", params={"until": after, "since": start.isoformat()}).json()["data"]) == 3

    pages, cursor = [], None
    while True:
        page = client.get("/v1/generations", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        pages.append([g["id"] for g in page["data"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [[bodies[2]["id"], bodies[1]["id"]], [bodies[0]["id"]]]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"pixel_sha256": "abc"}, "pixel_sha256"),
        ({"cursor": "page2"}, "cursor"),
        ({"since": "yesterday"}, "since"),
        ({"modle": "x"}, "modle"),
    ],
)
def test_bad_listing_parameters_are_422_naming_them(client, params, param):
    assert_error(client.get("/v1/generations", params=params), 422, "invalid_request", param)


def test_verify_png_and_manifest_then_doctored_and_altered(client):
    body = generate(client, seed=21, num_images=2)
    png = client.get(body["images"][1]["url"]).content
    result = client.post("/v1/verify", content=png, headers={"content-type": "image/png"}).json()
    assert {k: result[k] for k in ("valid", "signature_valid", "pixels_match", "image_index", "known_to_ledger")} == {
        "valid": True,
        "signature_valid": True,
        "pixels_match": True,
        "image_index": 1,
        "known_to_ledger": True,
    }
    assert result["generation_id"] == body["id"] and result["reasons"] == []
    by_manifest = client.post("/v1/verify", json=body["manifest"]).json()
    assert by_manifest["valid"] and by_manifest["pixels_match"] is None and by_manifest["known_to_ledger"]

    doctored = json.loads(json.dumps(body["manifest"]))
    doctored["request"]["seed"] = 22
    result = client.post("/v1/verify", json=doctored).json()
    assert not result["valid"] and not result["signature_valid"] and not result["known_to_ledger"]

    array = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy()
    array[5, 5] = 255 - array[5, 5]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    altered = embed_texts(buffer.getvalue(), read_texts(png))
    result = client.post("/v1/verify", content=altered, headers={"content-type": "image/png"}).json()
    assert result["signature_valid"] and result["pixels_match"] is False and not result["valid"]


def test_verify_refuses_what_it_cannot_verify(client):
    assert_error(client.post("/v1/verify", content=b""), 422, "invalid_request", "body")
    assert_error(client.post("/v1/verify", content=b"GIF89a..."), 400, "malformed_request", "body")
    assert_error(client.post("/v1/verify", content=b"{nope"), 400, "malformed_request", "body")
    assert_error(client.post("/v1/verify", json=[1, 2]), 422, "invalid_request", "body")
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    assert_error(client.post("/v1/verify", content=plain.getvalue()), 422, "invalid_request", "body")


def test_manifest_signed_elsewhere_is_not_valid_here(tmp_path, client):
    body = generate(client, seed=1)
    with make_client(tmp_path / "other") as other:
        result = other.post("/v1/verify", json=body["manifest"]).json()
    assert not result["signature_valid"] and "unknown signing key" in result["reasons"][0]
    assert result["known_to_ledger"] is False


def test_retention_by_age_prunes_files_keeps_rows_and_answers_410(tmp_path):
    with make_client(tmp_path, retention_days=1) as client:
        body = generate(client, seed=2, num_images=2)
        archive = client.app.state.archive
        assert archive.prune().generations == 0  # too young
        report = archive.prune(now=datetime.now(UTC) + timedelta(days=2))
        assert report.generations == 1 and report.bytes_freed > 0
        assert_error(client.get(body["images"][0]["url"]), 410, "image_gone")
        record = client.get(f"/v1/generations/{body['id']}").json()
        assert record["status"] == "pruned" and record["manifest"] == body["manifest"]
        assert [i["url"] for i in record["images"]] == [None, None]
        assert [g["id"] for g in client.get("/v1/generations", params={"status": "pruned"}).json()["data"]] == [
            body["id"]
        ]
        assert client.post("/v1/verify", json=body["manifest"]).json()["known_to_ledger"]


def test_retention_by_size_prunes_the_oldest_first(tmp_path):
    with make_client(tmp_path, retention_max_gb=1) as client:
        bodies = [generate(client, seed=s) for s in range(3)]
        archive = client.app.state.archive
        sizes = [len(client.get(b["images"][0]["url"]).content) for b in bodies]
        archive.retention_max_bytes = sizes[2] + 1  # room for the newest only
        assert archive.prune().generations == 2
        statuses = [client.get(f"/v1/generations/{b['id']}").json()["status"] for b in bodies]
        assert statuses == ["pruned", "pruned", "stored"]


def test_retention_runs_in_the_background(tmp_path):
    with make_client(tmp_path, retention_max_gb=1e-9, retention_interval_s=0.05) as client:
        body = generate(client)
        deadline = time.monotonic() + 10
        while client.get(f"/v1/generations/{body['id']}").json()["status"] != "pruned":
            assert time.monotonic() < deadline, "retention never pruned"
            time.sleep(0.05)


def test_files_are_on_disk_when_the_answer_arrives(tmp_path, client):
    body = generate(client, num_images=2)
    folder = tmp_path / "images" / body["id"][4:6] / body["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "manifest.json"]
    assert json.loads((folder / "manifest.json").read_text()) == body["manifest"]
