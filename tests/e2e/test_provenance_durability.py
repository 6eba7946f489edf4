"""A 200 survives SIGKILL, and rotating the signing key keeps old images verifiable."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.provenance.signing import private_key_pem


def key_file(path: Path) -> Path:
    path.write_bytes(private_key_pem(Ed25519PrivateKey.generate()))
    path.chmod(0o600)
    return path


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_sigkill_after_a_200_loses_nothing_and_rotation_keeps_old_images_verifiable(make_server, tmp_path):
    first = make_server("data", SAMESEED_SIGNING_KEY_FILE=str(key_file(tmp_path / "k1.pem"))).start()
    worker_pids = [w["pid"] for w in first.client.get("/readyz").json()["workers"]]
    body = first.generate(seed=31337, num_images=2)
    first.process.kill()  # SIGKILL the moment the answer is in
    first.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in worker_pids):  # workers notice their parent is gone and exit
        assert time.monotonic() < deadline, "orphan workers kept running"
        time.sleep(0.1)

    # Same data dir, a new signing key: the old generation is still there and still verifies.
    second = make_server("data", SAMESEED_SIGNING_KEY_FILE=str(key_file(tmp_path / "k2.pem"))).start()
    record = second.client.get(f"/v1/generations/{body['id']}")
    assert record.status_code == 200, record.text
    assert record.json()["manifest"] == body["manifest"] and record.json()["status"] == "stored"
    for image in body["images"]:
        stored = second.client.get(image["url"])
        assert stored.status_code == 200 and stored.content == base64.b64decode(image["png_base64"])

    new = second.generate(seed=7)
    keys = second.client.get("/v1/keys").json()["keys"]
    old_id, new_id = body["manifest"]["signature"]["key_id"], new["manifest"]["signature"]["key_id"]
    assert old_id != new_id
    assert [(k["key_id"], k["active"]) for k in keys] == [(new_id, True), (old_id, False)]
    for png, key_id in ((base64.b64decode(body["images"][0]["png_base64"]), old_id), (new["images"][0], new_id)):
        data = png if isinstance(png, bytes) else base64.b64decode(png["png_base64"])
        result = second.client.post("/v1/verify", content=data, headers={"content-type": "image/png"}).json()
        assert result["valid"] and result["known_to_ledger"] and result["key_id"] == key_id, result
