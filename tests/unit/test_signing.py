"""Manifest signatures: what is signed, key ids, the generated key, rotation, public key formats."""

import base64
import hashlib
import json
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.provenance.manifest import canonical_json
from app.provenance.signing import (
    KeyFileError,
    KeyRing,
    Signer,
    key_id,
    load_private_key,
    load_public_keys,
    private_key_pem,
    public_pem,
    raw_public_bytes,
    verify_signature,
)
from tests.support.samples import sample_generation


def signed_document(signer):
    manifest, _ = sample_generation()
    return json.loads(canonical_json(signer.sign(manifest).model_dump(mode="json")))


def test_signature_covers_the_canonical_manifest_without_the_signature_field():
    private = Ed25519PrivateKey.generate()
    document = signed_document(Signer(private))
    signature = document["signature"]
    assert signature["algorithm"] == "ed25519"
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    # the README recipe: plain `cryptography`, canonical JSON, raises if invalid
    private.public_key().verify(base64.b64decode(signature["value"]), canonical_json(unsigned))
    assert verify_signature(document, {signature["key_id"]: private.public_key()}).valid


def test_key_id_is_the_first_16_hex_of_sha256_of_the_raw_public_key():
    public = Ed25519PrivateKey.generate().public_key()
    assert key_id(public) == hashlib.sha256(raw_public_bytes(public)).hexdigest()[:16]


@pytest.mark.parametrize(
    "doctor",
    [
        lambda d: d["request"].__setitem__("seed", d["request"]["seed"] + 1),
        lambda d: d["images"][0].__setitem__("pixel_sha256", "0" * 64),
        lambda d: d["runtime"].__setitem__("torch_threads", 2),
        lambda d: d.__setitem__("extra", 1),
        lambda d: d["signature"].__setitem__("value", base64.b64encode(b"\0" * 64).decode()),
        lambda d: d["signature"].__setitem__("value", "not base64!"),
    ],
    ids=["seed", "pixel_hash", "runtime", "added_field", "zero_signature", "garbage_signature"],
)
def test_any_change_to_a_signed_manifest_fails(doctor):
    signer = Signer(Ed25519PrivateKey.generate())
    document = signed_document(signer)
    doctor(document)
    check = verify_signature(document, {signer.key_id: signer.public_key})
    assert not check.valid and check.key_id == signer.key_id and "altered" in check.reason


def test_unknown_key_and_missing_signature_fail_with_a_reason():
    signer = Signer(Ed25519PrivateKey.generate())
    document = signed_document(signer)
    other = Ed25519PrivateKey.generate().public_key()
    assert "unknown signing key" in verify_signature(document, {key_id(other): other}).reason
    del document["signature"]
    assert verify_signature(document, {signer.key_id: signer.public_key}).reason == "the manifest carries no signature"


def test_generated_key_is_0600_and_reused_on_the_next_start(tmp_path):
    first = KeyRing.open(tmp_path / "keys")
    key_file = tmp_path / "keys" / "signing_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = KeyRing.open(tmp_path / "keys")
    assert second.signer.key_id == first.signer.key_id
    assert [e.key_id for e in second.entries()] == [first.signer.key_id]
    assert not list((tmp_path / "keys").glob(".*tmp"))


def test_rotation_keeps_old_public_keys_listed_and_verifying(tmp_path):
    old = KeyRing.open(tmp_path / "keys")
    document = signed_document(old.signer)
    new_key = tmp_path / "new.pem"
    new_key.write_bytes(private_key_pem(Ed25519PrivateKey.generate()))
    rotated = KeyRing.open(tmp_path / "keys", key_file=new_key)
    entries = rotated.entries()
    assert [(e.key_id, e.active) for e in entries] == [(rotated.signer.key_id, True), (old.signer.key_id, False)]
    assert verify_signature(document, rotated.public_keys).valid
    assert signed_document(rotated.signer)["signature"]["key_id"] == rotated.signer.key_id


def test_a_bad_key_file_is_named_without_showing_its_content(tmp_path):
    secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n"
    path = tmp_path / "key.pem"
    path.write_text(secret)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path)
    assert str(path) in str(info.value) and "c2VjcmV0" not in str(info.value)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")


def test_public_keys_load_from_pem_file_keys_json_and_base64(tmp_path):
    public = Ed25519PrivateKey.generate().public_key()
    kid = key_id(public)
    pem = tmp_path / "public.pem"
    pem.write_text(public_pem(public))
    listing = tmp_path / "keys.json"
    raw = base64.b64encode(raw_public_bytes(public)).decode()
    listing.write_text(json.dumps({"keys": [{"key_id": kid, "public_key": raw}]}))
    for source in (str(pem), str(listing), raw):
        assert list(load_public_keys(source)) == [kid]
    with pytest.raises(ValueError):
        load_public_keys("bm90IGEga2V5")
