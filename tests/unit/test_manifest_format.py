"""Manifest format 2: RFC 8785 signed bytes any language reproduces, lossless non-finite floats; format 1 verifies."""

import base64
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.provenance.canonical import FLOAT_TAG, decode_floats, encode_floats, jcs, restore_floats
from app.provenance.manifest import ManifestScheduler, canonical_json
from app.provenance.png import MANIFEST_KEYWORD, embed_provenance, read_texts
from app.provenance.signing import PublicKeyEntry, Signer, load_public_keys, verify_signature
from app.provenance.verification import verify_png
from tests.support.samples import sample_generation

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "manifest-format-1"


# ---------------------------------------------------------------- an independent RFC 8785 implementation
def es6_number(value: float | int) -> str:
    """ECMAScript's Number.prototype.toString (RFC 8785 section 3.2.2.3), from Python's shortest repr digits."""
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k, n = len(digits), exponent + len(digits)  # value = 0.digits * 10^n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


def reference_jcs(value) -> str:
    """RFC 8785: keys sorted by UTF-16 code units, ES6 numbers, JSON.stringify strings, no whitespace."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return es6_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # the same escapes as ECMAScript's JSON.stringify
    if isinstance(value, list):
        return "[" + ",".join(reference_jcs(v) for v in value) + "]"
    keys = sorted(value, key=lambda key: key.encode("utf-16-be"))
    return "{" + ",".join(f"{reference_jcs(k)}:{reference_jcs(value[k])}" for k in keys) + "}"


# Number vectors from RFC 8785 appendix B, plus the two the issue names.
NUMBERS = [
    (0.0, "0"),
    (-0.0, "0"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (9007199254740992.0, "9007199254740992"),
    (1e21, "1e+21"),
    (999999999999999868928.0, "999999999999999900000"),
    (0.000001, "0.000001"),
    (9.999999999999997e-7, "9.999999999999997e-7"),
    (1e-7, "1e-7"),
    (7.0, "7"),
    (1e-05, "0.00001"),
    (-1.5, "-1.5"),
]


@pytest.mark.parametrize(("number", "expected"), NUMBERS)
def test_service_and_reference_jcs_write_numbers_as_rfc_8785_says(number, expected):
    assert jcs(number).decode() == expected
    assert es6_number(number) == expected


def test_jcs_sorts_keys_by_utf16_code_units_and_keeps_unicode():
    value = {"\ufb33": 2, "\U0001f600": 1, "b": "é\n\u2028", "a": [True, None, 7.0]}
    assert jcs(value).decode() == reference_jcs(value)
    # U+1F600 is the surrogate pair D83D DE00: before U+FB33 in UTF-16 order, after it in code-point order
    assert jcs(value).decode().index("\U0001f600") < jcs(value).decode().index("\ufb33")


def format2_manifest(signer):
    """A signed format-2 manifest holding 7.0, 1e-05 and -inf, as an HTTP client receives it."""
    manifest, pngs = sample_generation()
    request = dataclasses.replace(manifest.request, guidance_scale=7.0)
    scheduler = ManifestScheduler(
        class_name="DPMSolverMultistepScheduler",
        config={**manifest.scheduler.config, "beta_start": 1e-05, "lambda_min_clipped": float("-inf")},
    )
    manifest = manifest.model_copy(update={"request": request, "scheduler": scheduler})
    document = json.loads(canonical_json(signer.sign(manifest).model_dump(mode="json")))
    return document, embed_provenance(pngs[0], document, 0)


def test_format2_signature_verifies_with_an_independent_jcs_and_plain_ed25519():
    private = Ed25519PrivateKey.generate()
    document, _ = format2_manifest(Signer(private))
    assert document["format"] == "sameseed.manifest/2"
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    signed = reference_jcs(unsigned).encode("utf-8")
    raw = private.public_key().public_bytes_raw()
    Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(document["signature"]["value"]), signed)
    # Python's sorted-keys JSON is not what is signed: 7.0 and 1e-05 are written differently
    assert canonical_json(unsigned) != signed
    assert b'"guidance_scale":7,' in signed and b'"beta_start":0.00001,' in signed


def test_non_finite_floats_are_kept_and_restored_not_nulled():
    document, png = format2_manifest(Signer(Ed25519PrivateKey.generate()))
    assert document["scheduler"]["config"]["lambda_min_clipped"] == {FLOAT_TAG: "-Infinity"}
    embedded = json.loads(read_texts(png)[MANIFEST_KEYWORD], object_hook=restore_floats)
    assert embedded["scheduler"]["config"]["lambda_min_clipped"] == -math.inf
    assert decode_floats(document)["scheduler"]["config"]["lambda_min_clipped"] == -math.inf
    nan = decode_floats(encode_floats({"x": [math.nan, math.inf, 1.5]}))["x"]
    assert math.isnan(nan[0]) and nan[1:] == [math.inf, 1.5]
    # an object with other keys beside "$float" is data, not a float
    assert restore_floats({FLOAT_TAG: "-Infinity", "other": 1}) == {FLOAT_TAG: "-Infinity", "other": 1}


def test_a_manifest_relabelled_to_another_format_does_not_verify():
    private = Ed25519PrivateKey.generate()
    document, _ = format2_manifest(Signer(private))
    keys = {document["signature"]["key_id"]: private.public_key()}
    assert verify_signature(document, keys).valid
    assert not verify_signature({**document, "format": "sameseed.manifest/1"}, keys).valid
    check = verify_signature({**document, "format": "sameseed.manifest/9"}, keys)
    assert not check.valid and "unsupported manifest format" in check.reason


def verify_command(*args):
    """`python -m app verify ...` as a user runs it: exit code and the JSON it printed."""
    command = [sys.executable, "-m", "app", "verify", *map(str, args)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    return run.returncode, json.loads(run.stdout) if run.stdout else run.stderr


def test_format1_png_from_before_still_verifies():
    png = (FIXTURE / "image-0.png").read_bytes()
    result = verify_png(png, load_public_keys(str(FIXTURE / "keys.json")))
    assert result.manifest["format"] == "sameseed.manifest/1"
    assert result.valid and result.signature_valid and result.pixels_match and result.image_index == 0
    assert result.c2pa is not None and result.c2pa.present is False
    # format 1 had turned -inf into null; that manifest stays as it was signed
    assert result.manifest["scheduler"]["config"]["lambda_min_clipped"] is None
    code, printed = verify_command(FIXTURE / "image-0.png", "--public-key", FIXTURE / "keys.json")
    assert code == 0 and printed["valid"] is True and printed["c2pa"]["present"] is False


def test_a_javascript_verifier_with_a_maintained_jcs_package_accepts_format2_and_refuses_a_forgery(tmp_path):
    """tests/js/verify_manifest.mjs: npm's `canonicalize` (RFC 8785) and node:crypto's Ed25519, no Sameseed code."""
    verifier = ROOT / "tests" / "js" / "verify_manifest.mjs"
    assert shutil.which("node"), "node is needed for the cross-language check"
    assert (verifier.parent / "node_modules" / "canonicalize").is_dir(), "run `make dev-venv` (npm ci in tests/js)"
    signer = Signer(Ed25519PrivateKey.generate())
    document, _ = format2_manifest(signer)
    entry = PublicKeyEntry(signer.key_id, signer.public_key, True).describe()
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [entry]}))
    forged = json.loads(json.dumps(document))
    forged["request"]["guidance_scale"] = 7.5
    for name, manifest, expected in (("manifest.json", document, 0), ("forged.json", forged, 1)):
        # the manifest as a client received it: Python's JSON text, which JavaScript parses its own way
        (tmp_path / name).write_bytes(canonical_json(manifest))
        run = subprocess.run(
            ["node", str(verifier), str(tmp_path / name), str(tmp_path / "keys.json")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == expected, run.stdout + run.stderr
        assert run.stdout.startswith("valid" if expected == 0 else "invalid")
