"""POST /v1/reproduce end to end: identical replays, edited hashes (another thread count: test_restarts.py)."""

from __future__ import annotations

import base64


def replay(srv, **kwargs):
    response = srv.client.post("/v1/reproduce", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_fresh_manifest_replays_identical_on_its_key(server):
    made = server.generate(seed=404, num_images=2, sampler="euler_a")
    verdict = replay(server, json=made["manifest"])
    assert verdict["verdict"] == "identical" and verdict["same_key"] is True
    assert verdict["differences"] == [] and verdict["notes"] == []
    assert [i["latent_match"] and i["pixel_match"] for i in verdict["images"]] == [True, True]


def test_a_png_or_a_generation_id_replays_with_pixel_drift_measured(server):
    made = server.generate(seed=405)
    png = base64.b64decode(made["images"][0]["png_base64"])
    by_png = replay(server, content=png, headers={"content-type": "image/png"})
    assert by_png["verdict"] == "identical" and by_png["source"] == "png"
    assert by_png["images"][0]["pixel_drift"]["max_abs"] == 0
    by_id = replay(server, json={"generation_id": made["id"]})
    assert by_id["verdict"] == "identical" and by_id["source"] == "ledger"


def test_a_manifest_whose_hashes_were_edited_is_not_identical(server):
    made = server.generate(seed=406)
    manifest = made["manifest"]
    manifest["images"][0]["pixel_sha256"] = "f" * 64
    verdict = replay(server, json=manifest)
    assert verdict["verdict"] == "different" and verdict["images"][0]["pixel_match"] is False
    assert verdict["images"][0]["latent_match"] is True
    assert any("hashes were edited" in note for note in verdict["notes"])


def test_the_ledger_keeps_final_latents_that_hash_to_latent_sha256(server):
    import hashlib
    from pathlib import Path

    import numpy

    made = server.generate(seed=408)
    (path,) = Path(server.env["SAMESEED_DATA_DIR"]).rglob(f"{made['id']}/0.latents.npy")
    array = numpy.load(path)
    assert array.dtype == numpy.float32 and array.shape == (4, 32, 32)
    assert hashlib.sha256(array.tobytes()).hexdigest() == made["images"][0]["latent_sha256"]


def test_replay_refuses_what_is_not_a_manifest(server):
    bad = server.client.post("/v1/reproduce", json={"prompt": "a cat"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "manifest"
    unknown = server.client.post("/v1/reproduce", json={"generation_id": "gen_nope"})
    assert unknown.status_code == 404
