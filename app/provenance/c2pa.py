"""C2PA Content Credentials: the signer's certificate chain, signing each PNG with the C2PA SDK, reading it back.

Every PNG gets a C2PA manifest store (a `caBX` chunk written by c2pa-python) holding a
`c2pa.actions.v2` assertion (`c2pa.created`, IPTC digital source type `trainedAlgorithmicMedia`),
the hard binding to the file's other bytes (`c2pa.hash.data`), Sameseed as claim generator,
`org.sameseed.manifest` (generation id, image index, manifest format, Ed25519 key id, sha256 of the
signed manifest's RFC 8785 bytes) and `org.sameseed.model` (the model and the sha256 of each of its
files). The SDK only inserts a chunk: the image data chunks, so `pixel_sha256`, stay as they were.

Credentials: an operator's certificate chain and key, or else a development CA and signer made
once in the data dir. C2PA validators trust only signers under a trust anchor they are given, so
a development signer reads back as `Valid` with `signingCredential.untrusted`, as in every C2PA tool.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import secrets
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.provenance.canonical import jcs
from app.store.files import fsync_dir

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MANIFEST_ASSERTION = "org.sameseed.manifest"
MODEL_ASSERTION = "org.sameseed.model"
DEVELOPMENT_DIR = "c2pa"
CHAIN_NAME = "signer-chain.pem"
KEY_NAME = "signer-key.pem"
CA_NAME = "development-ca.pem"
_DEVELOPMENT_YEARS = 10
_TRUSTED = "Trusted"
_VALID_STATES = frozenset({"Valid", _TRUSTED})

# No thumbnail (the PNG is its own), and reading never reaches the network: no OCSP, no remote manifest.
_SIGN_SETTINGS: dict[str, Any] = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}
_READ_SETTINGS: dict[str, Any] = {"verify": {"ocsp_fetch": False, "remote_manifest_fetch": False}}


class C2paCredentialsError(ValueError):
    """C2PA certificate or key files are missing, unreadable, mismatched or unusable (never shows key bytes)."""


@dataclass(frozen=True)
class C2paCredentials:
    """A C2PA signer: PEM certificate chain (signing certificate first), PEM private key, algorithm."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    algorithm: str
    development: bool
    source: str = ""  # the certificate file, for messages

    def signer_name(self) -> str:
        """The signing certificate's subject common name (what C2PA tools show as the signer)."""
        leaf = x509.load_pem_x509_certificates(self.chain_pem)[0]
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else leaf.subject.rfc4514_string()


def _algorithm(key: Any, path: Path) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise C2paCredentialsError(f"{path} holds a key C2PA cannot sign with (use P-256/384/521 EC, Ed25519 or RSA)")


def load_credentials(cert_file: Path, key_file: Path) -> C2paCredentials:
    """Read an operator's chain and key; C2paCredentialsError names the file when they are unusable."""
    try:
        chain_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    except OSError as exc:
        raise C2paCredentialsError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise C2paCredentialsError(f"{cert_file} holds no PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise C2paCredentialsError(f"{key_file} does not hold an unencrypted PEM private key") from None
    algorithm = _algorithm(key, key_file)
    if chain[0].public_key() != key.public_key():
        raise C2paCredentialsError(f"the first certificate of {cert_file} is not for the key in {key_file}")
    return C2paCredentials(chain_pem, key_pem, algorithm, development=False, source=str(cert_file))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sameseed (development, untrusted)"),
        ]
    )


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _development_files() -> dict[str, bytes]:
    """A P-256 development root and an ES256 signer it certifies, as C2PA's certificate profile asks."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=365 * _DEVELOPMENT_YEARS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Sameseed development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign=False, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("Sameseed development signer"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    # The CA's private key is dropped here: nothing else is ever issued under it.
    return {
        CA_NAME: ca.public_bytes(pem),
        CHAIN_NAME: leaf.public_bytes(pem) + ca.public_bytes(pem),
        KEY_NAME: key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


def development_credentials(keys_dir: Path) -> C2paCredentials:
    """The development signer in `keys_dir/c2pa/`, made once (atomically: a folder renamed into place)."""
    folder = keys_dir / DEVELOPMENT_DIR
    if not (folder / KEY_NAME).exists():
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = keys_dir / f".{DEVELOPMENT_DIR}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            for name, data in _development_files().items():
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, folder)  # another process made it first: keep theirs
            except OSError:
                if not (folder / KEY_NAME).exists():
                    raise
            fsync_dir(keys_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    credentials = load_credentials(folder / CHAIN_NAME, folder / KEY_NAME)
    return C2paCredentials(
        credentials.chain_pem, credentials.key_pem, credentials.algorithm, development=True, source=credentials.source
    )


def manifest_sha256(signed_manifest: Mapping[str, Any]) -> str:
    """sha256 of the RFC 8785 bytes of the whole signed manifest (what `org.sameseed.manifest` names)."""
    return hashlib.sha256(jcs(dict(signed_manifest))).hexdigest()


def definition(signed_manifest: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The C2PA manifest definition of image `index` of a signed Sameseed manifest."""
    service = signed_manifest["service"]
    model = signed_manifest["model"]
    agent = {"name": service["name"], "version": service["version"]}
    signature = signed_manifest.get("signature") or {}
    return {
        "claim_generator_info": [agent],
        "title": f"{signed_manifest['id']}-{index}.png",
        "format": "image/png",
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE, "softwareAgent": agent}
                    ]
                },
            },
            {
                "label": MANIFEST_ASSERTION,
                "data": {
                    "generation_id": signed_manifest["id"],
                    "image_index": index,
                    "format": signed_manifest["format"],
                    "key_id": signature.get("key_id"),
                    "manifest_sha256": manifest_sha256(signed_manifest),
                    "reproducibility_key": signed_manifest["runtime"]["reproducibility_key"],
                },
            },
            {
                "label": MODEL_ASSERTION,
                "data": {
                    "id": model["id"],
                    "family": model["family"],
                    "pipeline": model["pipeline"],
                    "dtype": model["dtype"],
                    "hub_repo": model.get("hub_repo"),
                    "hub_revision": model.get("hub_revision"),
                    "files_sha256": dict(model["files"]),
                },
            },
        ],
    }


class ContentCredentials:
    """Signs PNGs with one C2PA signer (thread-safe: one native signer, used under a lock)."""

    def __init__(self, credentials: C2paCredentials) -> None:
        self.credentials = credentials
        self.signer_name = credentials.signer_name()
        try:
            self._signer = c2pa.Signer.from_info(
                c2pa.C2paSignerInfo(credentials.algorithm, credentials.chain_pem, credentials.key_pem, None)
            )
        except c2pa.C2paError as exc:
            raise C2paCredentialsError(f"the C2PA SDK refuses the signer in {credentials.source}: {exc}") from None
        self._lock = threading.Lock()

    def sign_png(self, png: bytes, signed_manifest: Mapping[str, Any], index: int) -> bytes:
        """The PNG with a C2PA manifest store for image `index` inserted; other chunks byte for byte."""
        context = c2pa.Context.from_dict(_SIGN_SETTINGS)
        builder = c2pa.Builder(definition(signed_manifest, index), context=context)
        out = io.BytesIO()
        with self._lock:
            builder.sign(self._signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()

    def check(self) -> None:
        """Sign a 1x1 PNG and read it back: C2paCredentialsError when the C2PA SDK rejects the chain."""
        probe = _probe_png()
        try:
            context = c2pa.Context.from_dict(_SIGN_SETTINGS)
            agent = {"name": "sameseed", "version": "credentials check"}
            created = {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE, "softwareAgent": agent}
            probe_definition = {
                "claim_generator_info": [agent],
                "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [created]}}],
            }
            builder = c2pa.Builder(probe_definition, context)
            out = io.BytesIO()
            with self._lock:
                builder.sign(self._signer, "image/png", io.BytesIO(probe), out)
        except c2pa.C2paError as exc:
            raise C2paCredentialsError(f"the C2PA SDK cannot sign with {self.credentials.source}: {exc}") from None
        result = read_content_credentials(out.getvalue())
        broken = [code for code in result.failures if code != "signingCredential.untrusted"]
        if not result.valid or broken:
            raise C2paCredentialsError(
                f"images signed with {self.credentials.source} do not validate: {', '.join(broken) or result.reason}"
            )


def _probe_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class C2paCheck:
    """What the C2PA SDK's Reader says about a PNG's Content Credentials."""

    present: bool
    valid: bool | None = None  # None: nothing to validate
    trusted: bool | None = None
    validation_state: str | None = None  # the SDK's: Invalid, Valid, Trusted
    failures: list[str] = field(default_factory=list)
    informational: list[str] = field(default_factory=list)
    successes: list[str] = field(default_factory=list)
    signer: dict[str, Any] | None = None
    digital_source_type: str | None = None
    sameseed: dict[str, Any] | None = None  # the org.sameseed.manifest assertion
    matches_manifest: bool | None = None  # that assertion names the manifest the PNG embeds; None: not compared
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready result."""
        return {
            "present": self.present,
            "valid": self.valid,
            "trusted": self.trusted,
            "validation_state": self.validation_state,
            "validation_status": {
                "failure": list(self.failures),
                "informational": list(self.informational),
                "success": list(self.successes),
            },
            "signer": self.signer,
            "digital_source_type": self.digital_source_type,
            "sameseed": self.sameseed,
            "matches_manifest": self.matches_manifest,
            "reason": self.reason,
        }


def _codes(entries: Any) -> list[str]:
    codes = [entry.get("code") for entry in entries or [] if isinstance(entry, dict)]
    return list(dict.fromkeys(code for code in codes if isinstance(code, str)))


def _assertion(manifest: Mapping[str, Any], label: str) -> Any:
    for assertion in manifest.get("assertions") or []:
        if isinstance(assertion, dict) and assertion.get("label") == label:
            return assertion.get("data")
    return None


def read_content_credentials(png: bytes, trust_anchors_pem: bytes | None = None) -> C2paCheck:
    """Validate a PNG's C2PA manifest store with the SDK (trusted only under `trust_anchors_pem`); never raises."""
    settings: dict[str, Any] = {**_READ_SETTINGS}
    if trust_anchors_pem:
        settings["trust"] = {"trust_anchors": trust_anchors_pem.decode("ascii")}
    try:
        context = c2pa.Context.from_dict(settings)
        reader = c2pa.Reader("image/png", io.BytesIO(png), None, context)
        active = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
        results = (reader.get_validation_results() or {}).get("activeManifest") or {}
    except (c2pa.C2paError, ValueError, OSError) as exc:  # whatever the bytes hold, the verifier answers
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in str(exc):
            return C2paCheck(present=False, reason="the PNG carries no C2PA manifest store")
        reason = f"the C2PA manifest store is unreadable: {exc}"
        return C2paCheck(present=True, valid=False, trusted=False, reason=reason)
    info = active.get("signature_info") or {}
    actions = (_assertion(active, "c2pa.actions.v2") or _assertion(active, "c2pa.actions") or {}).get("actions") or []
    created = next((a for a in actions if isinstance(a, dict) and a.get("action") == "c2pa.created"), {})
    check = C2paCheck(
        present=True,
        valid=state in _VALID_STATES,
        trusted=state == _TRUSTED,
        validation_state=state,
        failures=_codes(results.get("failure")),
        informational=_codes(results.get("informational")),
        successes=_codes(results.get("success")),
        signer={
            "common_name": info.get("common_name"),
            "issuer": info.get("issuer"),
            "algorithm": info.get("alg"),
            "cert_serial_number": info.get("cert_serial_number"),
        },
        digital_source_type=created.get("digitalSourceType"),
        sameseed=_assertion(active, MANIFEST_ASSERTION),
    )
    if check.valid and not check.trusted:
        check.reason = (
            "the C2PA signer is under no trust anchor this verifier was given "
            "(a development certificate, or an operator CA not configured): untrusted, as C2PA tools show it"
        )
    elif not check.valid:
        check.reason = f"the C2PA manifest store does not validate: {', '.join(check.failures) or state}"
    return check
