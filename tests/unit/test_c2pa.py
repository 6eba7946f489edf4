"""C2PA Content Credentials on every PNG: the C2PA SDK's Reader validates them, and sees any changed pixel."""

import base64
import datetime
import hashlib
import io
import json
import zlib

import c2pa
import numpy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from app.provenance.c2pa import DIGITAL_SOURCE_TYPE, C2paCredentialsError, manifest_sha256
from app.provenance.png import (
    MANIFEST_KEYWORD,
    PARAMETERS_KEYWORD,
    PNG_SIGNATURE,
    _chunk,
    chunks,
    embed_texts,
    read_texts,
)
from app.settings import Settings
from tests.support.fakes import answering_app


def make_client(data_dir, **settings):
    application = answering_app(Settings(data_dir=data_dir, workers="cpu:1", **settings))
    return TestClient(application)


def generate_png(client, **body):
    response = client.post("/v1/generations", json={"prompt": "a cat", "seed": 5, **body})
    assert response.status_code == 200, response.text
    body = response.json()
    return body, base64.b64decode(body["images"][0]["png_base64"])


def read(png, settings=None):
    context = c2pa.Context.from_dict(settings) if settings else None
    reader = c2pa.Reader("image/png", io.BytesIO(png), None, context)
    return reader.get_active_manifest(), reader.get_validation_state(), reader.get_validation_results()


def failures(results):
    return {entry["code"] for entry in results["activeManifest"].get("failure", [])}


def assertion(manifest, label):
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


def pixel_sha256(png):
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.uint8)
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def with_one_pixel_changed(png):
    """The same chunks, C2PA store included, with one byte of the first row's pixel data flipped."""
    parts = list(chunks(png))
    raw = bytearray(zlib.decompress(b"".join(data for kind, data in parts if kind == b"IDAT")))
    raw[10] ^= 0x01  # byte 0 of a row is its filter type; byte 10 is a colour sample
    out, written = [PNG_SIGNATURE], False
    for kind, data in parts:
        if kind == b"IDAT":
            if not written:
                out.append(_chunk(b"IDAT", zlib.compress(bytes(raw))))
                written = True
            continue
        out.append(_chunk(kind, data))
    return b"".join(out)


@pytest.fixture()
def client(tmp_path):
    with make_client(tmp_path) as test_client:
        yield test_client


def test_fresh_png_carries_content_credentials_the_c2pa_reader_validates(client):
    body, png = generate_png(client, num_images=1)
    active, state, results = read(png)
    # valid, and untrusted only because no trust anchor was given: the development signer
    assert state == "Valid" and failures(results) == {"signingCredential.untrusted"}
    assert {"claimSignature.validated", "assertion.dataHash.match"} <= {
        entry["code"] for entry in results["activeManifest"]["success"]
    }
    assert active["signature_info"]["common_name"] == "Sameseed development signer"
    assert active["claim_generator_info"][0]["name"] == "sameseed"
    assert active["claim_generator_info"][0]["version"] == body["manifest"]["service"]["version"]
    (created,) = assertion(active, "c2pa.actions.v2")["actions"]
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    sameseed = assertion(active, "org.sameseed.manifest")
    assert sameseed["generation_id"] == body["id"] and sameseed["image_index"] == 0
    assert sameseed["manifest_sha256"] == manifest_sha256(body["manifest"])
    assert sameseed["key_id"] == body["manifest"]["signature"]["key_id"]
    assert assertion(active, "org.sameseed.model")["files_sha256"] == body["manifest"]["model"]["files"]
    # the C2PA chunk changes no pixel, and the Sameseed chunks stay
    assert pixel_sha256(png) == body["images"][0]["pixel_sha256"]
    texts = read_texts(png)
    assert json.loads(texts[MANIFEST_KEYWORD]) == body["manifest"] and "Seed: 5" in texts[PARAMETERS_KEYWORD]
    assert client.get(body["images"][0]["url"]).content == png


def test_verify_reports_c2pa_beside_ed25519(client):
    body, png = generate_png(client)
    result = client.post("/v1/verify", content=png, headers={"content-type": "image/png"}).json()
    assert result["valid"] and result["signature_valid"] and result["known_to_ledger"]
    c2pa_result = result["c2pa"]
    assert c2pa_result["present"] and c2pa_result["valid"] and c2pa_result["trusted"] is False
    assert c2pa_result["validation_state"] == "Valid"
    assert c2pa_result["validation_status"]["failure"] == ["signingCredential.untrusted"]
    assert c2pa_result["signer"]["common_name"] == "Sameseed development signer"
    assert c2pa_result["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert c2pa_result["matches_manifest"] is True and "untrusted" in c2pa_result["reason"]
    assert client.post("/v1/verify", json=body["manifest"]).json()["c2pa"] is None


def test_one_changed_pixel_breaks_the_hard_binding(client):
    body, png = generate_png(client)
    altered = with_one_pixel_changed(png)
    assert pixel_sha256(altered) != pixel_sha256(png)
    _, state, results = read(altered)
    assert state == "Invalid" and "assertion.dataHash.mismatch" in failures(results)
    result = client.post("/v1/verify", content=altered, headers={"content-type": "image/png"}).json()
    assert result["pixels_match"] is False and not result["valid"]
    assert result["c2pa"]["valid"] is False
    assert "assertion.dataHash.mismatch" in result["c2pa"]["validation_status"]["failure"]


def test_credentials_moved_onto_another_generations_png_do_not_name_its_manifest(client):
    first, png = generate_png(client, seed=1)
    second, _ = generate_png(client, seed=2)
    # the first PNG, C2PA store kept, made to embed the second generation's (validly signed) manifest
    swapped = embed_texts(png, {MANIFEST_KEYWORD: json.dumps(second["manifest"])})
    assert any(kind == b"caBX" for kind, _ in chunks(swapped))
    result = client.post("/v1/verify", content=swapped, headers={"content-type": "image/png"}).json()
    assert result["signature_valid"] and result["generation_id"] == second["id"]
    assert result["c2pa"]["matches_manifest"] is False and result["c2pa"]["sameseed"]["generation_id"] == first["id"]
    assert result["c2pa"]["valid"] is False and "another Sameseed manifest" in result["c2pa"]["reason"]


def test_development_signer_is_made_once_and_kept(tmp_path):
    with make_client(tmp_path) as first:
        _, png = generate_png(first)
    with make_client(tmp_path) as second:
        _, again = generate_png(second)
    serial = read(png)[0]["signature_info"]["cert_serial_number"]
    assert read(again)[0]["signature_info"]["cert_serial_number"] == serial
    key_file = tmp_path / "keys" / "c2pa" / "signer-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    # the development CA, given as a trust anchor, makes the signer trusted
    anchors = {"trust": {"trust_anchors": (tmp_path / "keys" / "c2pa" / "development-ca.pem").read_text()}}
    assert read(png, anchors)[1] == "Trusted"


# ---------------------------------------------------------------- an operator's certificate chain
def _cert(subject, issuer, public_key, signing_key, *, ca, algorithm=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    return builder.sign(signing_key, algorithm)


def operator_files(folder):
    """A newsroom CA (P-256) and an Ed25519 signer it certifies, as PEM files."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    ca_name, sha256 = "Example Newsroom CA", hashes.SHA256()
    ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True, algorithm=sha256)
    leaf = _cert("Example Newsroom image signer", ca_name, key.public_key(), ca_key, ca=False, algorithm=sha256)
    pem = serialization.Encoding.PEM
    paths = {name: folder / name for name in ("chain.pem", "key.pem", "ca.pem", "ca-key.pem")}
    paths["chain.pem"].write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    paths["key.pem"].write_bytes(key.private_bytes(pem, pkcs8, plain))
    paths["ca.pem"].write_bytes(ca.public_bytes(pem))
    paths["ca-key.pem"].write_bytes(ca_key.private_bytes(pem, pkcs8, plain))
    return paths


def test_operator_chain_signs_and_its_ca_makes_it_trusted(tmp_path):
    files = operator_files(tmp_path)
    settings = {
        "c2pa_cert_file": files["chain.pem"],
        "c2pa_key_file": files["key.pem"],
        "c2pa_trust_anchors_file": files["ca.pem"],
    }
    with make_client(tmp_path / "data", **settings) as client:
        _, png = generate_png(client)
        result = client.post("/v1/verify", content=png, headers={"content-type": "image/png"}).json()["c2pa"]
    assert result["signer"]["common_name"] == "Example Newsroom image signer"
    assert result["signer"]["algorithm"] == "Ed25519"
    assert result["validation_state"] == "Trusted" and result["trusted"] and result["reason"] is None
    assert not (tmp_path / "data" / "keys" / "c2pa").exists()  # no development signer was made


def test_unusable_c2pa_credentials_stop_the_start_naming_the_file(tmp_path):
    files = operator_files(tmp_path)
    with pytest.raises(ValidationError, match="SAMESEED_C2PA_CERT_FILE and SAMESEED_C2PA_KEY_FILE"):
        Settings(data_dir=tmp_path, c2pa_cert_file=files["chain.pem"])
    with pytest.raises(C2paCredentialsError, match="is not for the key in"):
        make_client(tmp_path / "a", c2pa_cert_file=files["chain.pem"], c2pa_key_file=files["ca-key.pem"])
    with pytest.raises(C2paCredentialsError, match="holds no PEM certificate chain"):
        make_client(tmp_path / "b", c2pa_cert_file=files["key.pem"], c2pa_key_file=files["key.pem"])
    # a self-signed CA certificate is no C2PA signer: the SDK refuses it at start, not at the first image
    with pytest.raises(C2paCredentialsError, match=r"ca\.pem: .*self-signed"), make_client(
        tmp_path / "c", c2pa_cert_file=files["ca.pem"], c2pa_key_file=files["ca-key.pem"]
    ):
        pass


def test_offline_verify_command_reports_c2pa_and_trusts_a_given_anchor(tmp_path):
    from tests.unit.test_manifest_format import verify_command

    with make_client(tmp_path / "data") as client:
        _, png = generate_png(client)
        (tmp_path / "keys.json").write_text(client.get("/v1/keys").text)
    (tmp_path / "image.png").write_bytes(png)
    command = [tmp_path / "image.png", "--public-key", tmp_path / "keys.json"]
    code, printed = verify_command(*command)
    assert code == 0 and printed["c2pa"]["valid"] and printed["c2pa"]["trusted"] is False
    anchor = tmp_path / "data" / "keys" / "c2pa" / "development-ca.pem"
    code, printed = verify_command(*command, "--c2pa-trust-anchors", anchor)
    assert code == 0 and printed["c2pa"]["validation_state"] == "Trusted" and printed["c2pa"]["trusted"] is True
