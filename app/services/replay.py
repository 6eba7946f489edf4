"""Replay a past generation from its manifest and judge whether it came out bit for bit identical."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import numpy
from PIL import Image
from pydantic import ValidationError

from app.errors import InvalidRequest, MalformedRequest, SameseedError
from app.params import GenerationParams
from app.provenance.drift import key_differences, latent_drift, pixel_drift
from app.provenance.hashes import latents_from_bytes, pixel_sha256
from app.provenance.manifest import Manifest, parse_json
from app.provenance.png import PNG_SIGNATURE
from app.provenance.verification import UnverifiableInput, decode_pixels, embedded_manifest, pixel_matches
from app.scheduler.dispatcher import Disconnected
from app.services.generation import GenerationService


@dataclass
class ReplaySource:
    """What was given to replay: the manifest and whatever original pixels or latents came with it."""

    manifest: dict[str, Any]
    origin: str  # "manifest", "png" or "ledger"
    pixels: dict[int, Image.Image] = field(default_factory=dict)
    latents: dict[int, numpy.ndarray] = field(default_factory=dict)
    signature: dict[str, Any] | None = None


def _decode(png: bytes) -> Image.Image:
    try:
        return decode_pixels(png)
    except UnverifiableInput as exc:
        raise InvalidRequest(str(exc), param="body") from None


def load_source(body: bytes, archive: Any | None) -> ReplaySource:
    """Parse the request body: a PNG with a manifest, a manifest JSON, or {"generation_id": ...} (blocking)."""
    if body.startswith(PNG_SIGNATURE):
        try:
            manifest = embedded_manifest(body)
        except UnverifiableInput as exc:
            raise InvalidRequest(str(exc), param="body") from None
        source = ReplaySource(manifest=manifest, origin="png")
        image = _decode(body)
        matches = pixel_matches(manifest, pixel_sha256(image))
        index = matches[0] if matches else None
        if isinstance(index, int) and not isinstance(index, bool):
            source.pixels[index] = image
        return _with_signature(source, archive)
    try:
        document = parse_json(body)
    except ValueError as exc:
        raise MalformedRequest(f"the body is neither a PNG nor valid JSON: {exc}", param="body") from None
    if not isinstance(document, dict):
        raise InvalidRequest("send a manifest object, {\"generation_id\": ...}, or a PNG", param="body")
    if set(document) == {"generation_id"}:
        return _from_ledger(str(document["generation_id"]), archive)
    if "manifest" in document and isinstance(document["manifest"], dict):
        document = document["manifest"]  # a whole /v1/generations response body is accepted too
    return _with_signature(ReplaySource(manifest=document, origin="manifest"), archive)


def _with_signature(source: ReplaySource, archive: Any | None) -> ReplaySource:
    if archive is not None and "signature" in source.manifest:
        source.signature = archive.verify_manifest(source.manifest).as_dict()
    return source


def _from_ledger(generation_id: str, archive: Any | None) -> ReplaySource:
    if archive is None:
        raise InvalidRequest("this server keeps no ledger; send the manifest instead", param="generation_id")
    row = archive.get(generation_id)
    source = ReplaySource(manifest=json.loads(row.manifest), origin="ledger")
    for image in row.images:
        try:
            source.pixels[image.index] = _decode(archive.image_bytes(generation_id, image.index))
        except SameseedError:
            continue  # pruned: the manifest still replays, without pixel drift
        array = archive.latents(generation_id, image.index)
        if array is not None:
            source.latents[image.index] = array
    return _with_signature(source, archive)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """Where (dotted path) and what the first validation error is."""
    first = exc.errors()[0]
    return ".".join(str(p) for p in first.get("loc", ())), str(first.get("msg"))


def parse_manifest(source: ReplaySource) -> Manifest:
    """The source's manifest validated as one (422 naming the first bad field)."""
    try:
        original = Manifest.model_validate(source.manifest)
    except ValidationError as exc:
        where, message = first_error(exc)
        raise InvalidRequest(f"not a valid Sameseed manifest: {where}: {message}", param="manifest") from None
    if len(original.images) != original.request.num_images:
        raise InvalidRequest(
            f"the manifest lists {len(original.images)} images but its request made {original.request.num_images}",
            param="manifest.images",
        )
    return original


async def reproduce(
    generations: GenerationService,
    source: ReplaySource,
    original: Manifest,
    params: GenerationParams,
    disconnected: Disconnected | None = None,
) -> dict[str, Any]:
    """Regenerate the manifest's images (on a worker of its key when one exists) and judge the bits."""
    # 1. Route to the manifest's key when a worker has it; otherwise anywhere, and say so.
    key = original.runtime.reproducibility_key
    has_key = generations.has_key(params.model, key)
    outcome = await generations.generate(
        params, reproducibility_key=key if has_key else None, disconnected=disconnected
    )
    replay = outcome.manifest.model_dump(mode="json")
    notes: list[str] = []
    if not has_key:
        notes.append(
            f"no worker of this server has reproducibility key {key}; replayed under "
            f"{outcome.manifest.runtime.reproducibility_key}, where bitwise equality is not promised"
        )

    # 2. Compare every image: hashes, then drift where the original pixels or latents are at hand.
    images = []
    for expected, rendered in zip(original.images, outcome.images, strict=True):
        got = rendered.image
        entry: dict[str, Any] = {
            "index": expected.index,
            "seed": expected.seed,
            "latent_match": expected.latent_sha256 == got.latent_sha256,
            "pixel_match": expected.pixel_sha256 == got.pixel_sha256,
            "original_latent_sha256": expected.latent_sha256,
            "replay_latent_sha256": got.latent_sha256,
            "original_pixel_sha256": expected.pixel_sha256,
            "replay_pixel_sha256": got.pixel_sha256,
            "latent_drift": None,
            "pixel_drift": None,
        }
        if expected.index in source.pixels:
            replay_pixels = await asyncio.to_thread(_decode, rendered.png)
            entry["pixel_drift"] = pixel_drift(source.pixels[expected.index], replay_pixels).to_json()
        replay_latents = latents_from_bytes(rendered.latents, rendered.latent_shape)
        if expected.index in source.latents and replay_latents is not None:
            entry["latent_drift"] = latent_drift(source.latents[expected.index], replay_latents).to_json()
        images.append(entry)
    identical = all(i["latent_match"] and i["pixel_match"] for i in images)
    differences = [d.to_json() for d in key_differences(source.manifest, replay)]
    same_key = key == outcome.manifest.runtime.reproducibility_key
    if same_key and not identical:
        notes.append(
            "same reproducibility key yet different bits: the manifest's hashes were edited, "
            "or this runtime broke the contract (run the golden suite)"
        )
    if not any(i["pixel_drift"] for i in images) and not identical:
        notes.append("no original pixels were given (send the PNG or a generation id) so no drift is measured")
    if source.signature is not None and not source.signature.get("signature_valid"):
        notes.append("the manifest's signature does not verify: it was altered after signing or signed elsewhere")
    return {
        "verdict": "identical" if identical else "different",
        "identical": identical,
        "source": source.origin,
        "original_id": original.id,
        "original_reproducibility_key": key,
        "replay_reproducibility_key": outcome.manifest.runtime.reproducibility_key,
        "same_key": same_key,
        "differences": differences,
        "images": images,
        "signature": source.signature,
        "notes": notes,
        "replay": {"id": outcome.id, "manifest": replay},
    }
