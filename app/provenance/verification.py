"""Verification of a PNG or a manifest: signature, pixels against the signed pixel hashes, C2PA credentials.

Pure functions over bytes and public keys, shared by POST /v1/verify and the offline CLI.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image, UnidentifiedImageError

from app.provenance.c2pa import C2paCheck, manifest_sha256, read_content_credentials
from app.provenance.hashes import pixel_sha256
from app.provenance.manifest import parse_json
from app.provenance.png import MANIFEST_KEYWORD, PngError, read_texts
from app.provenance.signing import verify_signature

MAX_VERIFY_PIXELS = 8192 * 8192  # the largest size any model may produce


class UnverifiableInput(ValueError):
    """The input is not something that can be verified (not a PNG, no manifest, not a JSON object)."""


@dataclass
class Verification:
    """What a verifier can say about one PNG or manifest."""

    signature_valid: bool
    key_id: str | None
    generation_id: str | None
    pixels_match: bool | None = None  # None: no pixels were given (manifest only)
    image_index: int | None = None  # the manifest image whose pixel hash the pixels match
    known_to_ledger: bool | None = None  # None: no ledger consulted (offline)
    reasons: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    c2pa: C2paCheck | None = None  # None: a bare manifest (C2PA credentials live in the PNG)

    @property
    def valid(self) -> bool:
        """Signed by a known key, unaltered, and (when pixels were given) the pixels match."""
        return self.signature_valid and self.pixels_match is not False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready result (without the manifest)."""
        return {
            "valid": self.valid,
            "signature_valid": self.signature_valid,
            "key_id": self.key_id,
            "generation_id": self.generation_id,
            "pixels_match": self.pixels_match,
            "image_index": self.image_index,
            "known_to_ledger": self.known_to_ledger,
            "reasons": list(self.reasons),
            "c2pa": self.c2pa.as_dict() if self.c2pa is not None else None,
        }


def parse_manifest(text: str | bytes) -> dict[str, Any]:
    """A manifest JSON object; UnverifiableInput when the text is not one."""
    try:
        document = parse_json(text)
    except ValueError as exc:
        raise UnverifiableInput(f"the manifest is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise UnverifiableInput("the manifest must be a JSON object")
    return document


def verify_manifest(manifest: Mapping[str, Any], public_keys: Mapping[str, Ed25519PublicKey]) -> Verification:
    """Check a manifest's signature against the known public keys."""
    check = verify_signature(manifest, public_keys)
    generation_id = manifest.get("id")
    return Verification(
        signature_valid=check.valid,
        key_id=check.key_id,
        generation_id=generation_id if isinstance(generation_id, str) else None,
        reasons=[check.reason] if check.reason else [],
        manifest=dict(manifest),
    )


def embedded_manifest(png: bytes) -> dict[str, Any]:
    """The manifest a PNG embeds; UnverifiableInput when the PNG is malformed or carries none."""
    try:
        texts = read_texts(png)
    except PngError as exc:
        raise UnverifiableInput(str(exc)) from None
    if MANIFEST_KEYWORD not in texts:
        raise UnverifiableInput(f"the PNG carries no {MANIFEST_KEYWORD!r} text chunk")
    return parse_manifest(texts[MANIFEST_KEYWORD])


def decode_pixels(png: bytes) -> Image.Image:
    """A PNG's pixels as RGB; UnverifiableInput when undecodable or larger than any model makes."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.width * image.height > MAX_VERIFY_PIXELS:
                raise UnverifiableInput(f"the PNG is {image.width}x{image.height}; too large to verify")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnverifiableInput):
            raise
        raise UnverifiableInput(f"the PNG's pixels cannot be decoded: {exc}") from None


def pixel_matches(manifest: Mapping[str, Any], digest: str) -> list[Any]:
    """The recorded `index` of every manifest image whose pixel_sha256 is `digest`, in manifest order."""
    images = manifest.get("images")
    return [
        image.get("index")
        for image in (images if isinstance(images, list) else [])
        if isinstance(image, dict) and image.get("pixel_sha256") == digest
    ]


def _c2pa_names_manifest(check: C2paCheck, manifest: Mapping[str, Any]) -> str | None:
    """Why the C2PA `org.sameseed.manifest` assertion does not name this manifest; None when it does."""
    claimed = check.sameseed
    if not isinstance(claimed, dict):
        return "the C2PA manifest store has no org.sameseed.manifest assertion"
    try:
        digest = manifest_sha256(manifest)
    except ValueError:
        digest = None
    if claimed.get("generation_id") != manifest.get("id") or claimed.get("manifest_sha256") != digest:
        return "the C2PA credentials name another Sameseed manifest than the one this PNG embeds"
    return None


def verify_png(
    png: bytes, public_keys: Mapping[str, Ed25519PublicKey], trust_anchors_pem: bytes | None = None
) -> Verification:
    """Check the embedded manifest's signature, that the pixels hash to one of its images, and C2PA credentials.

    The C2PA result is reported beside the Ed25519 one and does not change `valid`; it is trusted
    only when its chain leads to one of `trust_anchors_pem`.
    """
    result = verify_manifest(embedded_manifest(png), public_keys)
    digest = pixel_sha256(decode_pixels(png))
    matches = pixel_matches(result.manifest or {}, digest)
    result.pixels_match = bool(matches)
    result.image_index = matches[0] if matches and isinstance(matches[0], int) else None
    if not matches:
        result.reasons.append(f"the pixels hash to {digest}, which no image of the manifest records")
    result.c2pa = read_content_credentials(png, trust_anchors_pem)
    if result.c2pa.present:
        mismatch = _c2pa_names_manifest(result.c2pa, result.manifest or {})
        result.c2pa.matches_manifest = mismatch is None
        if mismatch:
            result.c2pa.reason = mismatch if result.c2pa.reason is None else f"{result.c2pa.reason}; {mismatch}"
    return result
