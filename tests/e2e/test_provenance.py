"""Signed manifests in real PNGs from the real server: verify online and offline, ledger links and filters."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy
from PIL import Image

from app.provenance.png import MANIFEST_KEYWORD, embed_texts, read_texts
from tests.e2e.conftest import ROOT


def offline_verify(path, keys_path):
    """`python -m app verify FILE --public-key KEYS`: (exit code, JSON result)."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "verify", str(path), "--public-key", str(keys_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout) if done.stdout else done.stderr


def verify_online(server, png):
    response = server.client.post("/v1/verify", content=png, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_png_verifies_and_a_doctored_seed_or_altered_pixels_fail(server, tmp_path):
    body = server.generate(seed=4242, num_images=2)
    png = base64.b64decode(body["images"][1]["png_base64"])
    embedded = json.loads(read_texts(png)[MANIFEST_KEYWORD])
    assert embedded == body["manifest"] and embedded["signature"]["algorithm"] == "ed25519"
    assert "Seed: 4243," in Image.open(io.BytesIO(png)).info["parameters"]

    online = verify_online(server, png)
    assert online["valid"] and online["known_to_ledger"] and online["image_index"] == 1
    keys = tmp_path / "keys.json"
    keys.write_text(server.client.get("/v1/keys").text)
    (tmp_path / "image.png").write_bytes(png)
    code, offline = offline_verify(tmp_path / "image.png", keys)
    assert code == 0 and offline["valid"] and offline["key_id"] == embedded["signature"]["key_id"]

    doctored = json.loads(json.dumps(embedded))
    doctored["request"]["seed"] = 1
    (tmp_path / "doctored.png").write_bytes(embed_texts(png, {MANIFEST_KEYWORD: json.dumps(doctored)}))
    code, offline = offline_verify(tmp_path / "doctored.png", keys)
    assert code == 1 and not offline["signature_valid"] and offline["pixels_match"]
    assert not verify_online(server, (tmp_path / "doctored.png").read_bytes())["signature_valid"]

    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy()
    pixels[10, 10, 1] ^= 0x10
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (tmp_path / "altered.png").write_bytes(embed_texts(buffer.getvalue(), read_texts(png)))
    code, offline = offline_verify(tmp_path / "altered.png", keys)
    assert code == 1 and offline["signature_valid"] and offline["pixels_match"] is False
    assert verify_online(server, (tmp_path / "altered.png").read_bytes())["pixels_match"] is False


def test_links_only_responses_and_ledger_filters_with_pages(server):
    since = datetime.now(UTC).isoformat()
    bodies = [server.generate(seed=seed, response_format="url") for seed in (601, 602, 603)]
    assert all(i["png_base64"] is None for b in bodies for i in b["images"])
    image = bodies[1]["images"][0]
    png = server.client.get(image["url"]).content
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == image["pixel_sha256"]

    key = bodies[0]["manifest"]["runtime"]["reproducibility_key"]
    seen, cursor = [], None
    while True:
        params = {"since": since, "reproducibility_key": key, "model": "sameseed-tiny", "limit": 2}
        page = server.client.get("/v1/generations", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += [g["id"] for g in page.json()["data"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [b["id"] for b in reversed(bodies)]
    by_latent = server.client.get("/v1/generations", params={"latent_sha256": image["latent_sha256"], "since": since})
    assert [g["id"] for g in by_latent.json()["data"]] == [bodies[1]["id"]]


def test_readme_recipe_verifies_with_cryptography_and_pillow_alone(server, tmp_path):
    """The README's offline recipe, line for line."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    body = server.generate(seed=5150)
    (tmp_path / "image-0.png").write_bytes(base64.b64decode(body["images"][0]["png_base64"]))
    (tmp_path / "keys.json").write_text(server.client.get("/v1/keys").text)
    m = json.loads(Image.open(tmp_path / "image-0.png").info["sameseed.manifest"])
    key = next(k for k in json.load(open(tmp_path / "keys.json"))["keys"] if k["key_id"] == m["signature"]["key_id"])
    signed = json.dumps(
        {k: v for k, v in m.items() if k != "signature"}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    public.verify(base64.b64decode(m["signature"]["value"]), signed)  # raises if forged
    pixels = numpy.asarray(Image.open(tmp_path / "image-0.png").convert("RGB"), dtype=numpy.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == m["images"][0]["pixel_sha256"]
