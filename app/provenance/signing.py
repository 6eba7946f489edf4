"""Ed25519 manifest signatures: the signing key, the ring of public keys, and verification.

The signature covers the canonical bytes of the manifest without its `signature` field: RFC 8785
(JCS) for format 2, Python's sorted-keys `canonical_json` for format 1 (still verified). A key id is
the first 16 hex digits of sha256 of the raw 32-byte public key. Public keys of every key that ever
signed stay in `<keys dir>/public/<key id>.pem`, so rotation never orphans an old image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.provenance.canonical import jcs
from app.provenance.manifest import MANIFEST_FORMAT_1, MANIFEST_FORMATS, Manifest, ManifestSignature, canonical_json
from app.store.files import fsync_dir

ALGORITHM = "ed25519"
GENERATED_KEY_NAME = "signing_key.pem"
PUBLIC_DIR_NAME = "public"


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or not an Ed25519 key (the message never shows key bytes)."""


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(public_key: Ed25519PublicKey) -> str:
    """A public key as SubjectPublicKeyInfo PEM text."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 of the raw public key."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


def signed_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature covers: the manifest without `signature`, canonical for its format.

    Format 2: RFC 8785 bytes. Format 1: Python's `canonical_json`. ValueError for another format,
    or a value RFC 8785 cannot encode.
    """
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    fmt = manifest.get("format")
    if fmt == MANIFEST_FORMAT_1:
        return canonical_json(unsigned)
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"unsupported manifest format {fmt!r} (this service reads {', '.join(MANIFEST_FORMATS)})")
    return jcs(unsigned)


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM of a private key (what `openssl genpkey -algorithm ed25519` writes)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file; KeyFileError names the file, never its bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the signing key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} does not hold an unencrypted Ed25519 private key in PEM "
            "(make one with `openssl genpkey -algorithm ed25519 -out key.pem`)"
        )
    return key


def write_private_key(path: Path, private_key: Ed25519PrivateKey) -> bool:
    """Write a key file with mode 0600 unless one exists (atomic: temp file, fsync, link); True if written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_pem(private_key))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key first: keep theirs
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: rename, still never over an existing key
            if path.exists():
                return False
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_public_key(text: str) -> Ed25519PublicKey:
    """Parse a public key given as PEM text or as base64 of the raw 32 bytes; ValueError otherwise."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM public key is not an Ed25519 key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a public key must be PEM or base64 of 32 raw bytes") from None
    if len(raw) != 32:
        raise ValueError(f"a raw Ed25519 public key has 32 bytes; got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_keys(source: str) -> dict[str, Ed25519PublicKey]:
    """Public keys by id from a PEM file, a saved `GET /v1/keys` JSON file, or a base64 key literal."""
    path = Path(source)
    text = path.read_text() if path.is_file() else source
    if text.lstrip().startswith("{"):
        document = json.loads(text)
        keys = [load_public_key(entry["public_key"]) for entry in document.get("keys", [])]
    else:
        keys = [load_public_key(text)]
    if not keys:
        raise ValueError(f"no public key in {source}")
    return {key_id(k): k for k in keys}


@dataclass(frozen=True)
class PublicKeyEntry:
    """One public key the service has signed with."""

    key_id: str
    public_key: Ed25519PublicKey
    active: bool

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (GET /v1/keys)."""
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": base64.b64encode(raw_public_bytes(self.public_key)).decode("ascii"),
            "public_key_pem": public_pem(self.public_key),
            "active": self.active,
        }


@dataclass(frozen=True)
class SignatureCheck:
    """The result of checking one manifest's signature."""

    valid: bool
    key_id: str | None
    reason: str | None = None


class Signer:
    """Signs manifests with one Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, manifest: Manifest) -> Manifest:
        """Return the manifest with its `signature` set (over the manifest without the signature)."""
        unsigned = manifest.model_dump(mode="json", exclude={"signature"})
        value = self._private_key.sign(signed_bytes(unsigned))
        signature = ManifestSignature(
            algorithm=ALGORITHM, key_id=self.key_id, value=base64.b64encode(value).decode("ascii")
        )
        return manifest.model_copy(update={"signature": signature})


class KeyRing:
    """The active signer and the public keys of every key that signed here (by key id)."""

    def __init__(self, signer: Signer, public_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.signer = signer
        self.public_keys = {**public_keys, signer.key_id: signer.public_key}

    @classmethod
    def open(cls, keys_dir: Path, key_file: Path | None = None) -> KeyRing:
        """Load the key from `key_file` (or generate one into `keys_dir` once) and publish its public key."""
        if key_file is not None:
            private_key = load_private_key(key_file)
        else:
            generated = keys_dir / GENERATED_KEY_NAME
            if not generated.exists():
                write_private_key(generated, Ed25519PrivateKey.generate())
            private_key = load_private_key(generated)
        signer = Signer(private_key)
        public_dir = keys_dir / PUBLIC_DIR_NAME
        public_dir.mkdir(parents=True, exist_ok=True)
        published = public_dir / f"{signer.key_id}.pem"
        if not published.exists():
            tmp = published.with_name(f".{published.name}.{secrets.token_hex(6)}.tmp")
            tmp.write_text(public_pem(signer.public_key))
            os.replace(tmp, published)
            fsync_dir(public_dir)
        known: dict[str, Ed25519PublicKey] = {}
        for path in sorted(public_dir.glob("*.pem")):
            key = load_public_key(path.read_text())
            known[key_id(key)] = key
        return cls(signer, known)

    def entries(self) -> list[PublicKeyEntry]:
        """Every known public key, the active one first."""
        ordered = sorted(self.public_keys.items(), key=lambda item: (item[0] != self.signer.key_id, item[0]))
        return [PublicKeyEntry(kid, key, kid == self.signer.key_id) for kid, key in ordered]


def verify_signature(manifest: Mapping[str, Any], public_keys: Mapping[str, Ed25519PublicKey]) -> SignatureCheck:
    """Check a manifest's Ed25519 signature against the known public keys; never raises on bad input."""
    signature = manifest.get("signature")
    if not isinstance(signature, Mapping):
        return SignatureCheck(False, None, "the manifest carries no signature")
    kid = signature.get("key_id")
    kid = kid if isinstance(kid, str) else None
    if manifest.get("format") not in MANIFEST_FORMATS:
        return SignatureCheck(False, kid, f"unsupported manifest format {manifest.get('format')!r}")
    if signature.get("algorithm") != ALGORITHM:
        return SignatureCheck(False, kid, f"unsupported signature algorithm {signature.get('algorithm')!r}")
    public_key = public_keys.get(kid) if kid else None
    if public_key is None:
        return SignatureCheck(False, kid, f"unknown signing key id {kid!r}")
    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
        public_key.verify(value, signed_bytes(manifest))
    except (binascii.Error, ValueError, InvalidSignature):
        return SignatureCheck(False, kid, "the signature does not match the manifest (altered or forged)")
    return SignatureCheck(True, kid)
