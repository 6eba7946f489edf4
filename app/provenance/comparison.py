"""The `compare` command: read manifests or PNGs from files, compare them, print a table or JSON.

Exit codes: 0 when every image's latent and pixel hashes agree, 1 when any differ, 2 on bad input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, UnidentifiedImageError

from app.provenance.drift import (
    FILES_FIELD,
    ComparedItem,
    Comparison,
    FieldRow,
    ImageAgreement,
    compare_manifests,
    rgb_array,
)
from app.provenance.manifest import MANIFEST_FORMATS
from app.provenance.png import MANIFEST_KEYWORD, PNG_SIGNATURE, PngError, read_texts

_VALUE_WIDTH = 24
_HEX_SHOWN = 12


class InputError(ValueError):
    """A compare argument that cannot be read as a manifest, a generation response or a PNG with a manifest."""


def manifest_of(document: Any) -> dict[str, Any]:
    """The manifest in a JSON document: a bare manifest, a /v1/generations response, or {manifest, signature}."""
    if isinstance(document, dict) and "format" not in document and isinstance(document.get("manifest"), dict):
        document = document["manifest"]
    if not isinstance(document, dict) or "format" not in document:
        raise InputError("no Sameseed manifest (expected a manifest, a /v1/generations response or a PNG)")
    if document["format"] not in MANIFEST_FORMATS:
        raise InputError(
            f"unsupported manifest format {document['format']!r} (this tool reads {', '.join(MANIFEST_FORMATS)})"
        )
    for section, kind in (("model", dict), ("runtime", dict), ("images", list)):
        if not isinstance(document.get(section), kind):
            raise InputError(f"the manifest has no {section!r} {kind.__name__}")
    return document


def _decode_png(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"the PNG's pixels cannot be decoded: {exc}") from None


def _png_item(label: str, data: bytes) -> ComparedItem:
    try:
        text = read_texts(data).get(MANIFEST_KEYWORD)
    except PngError as exc:
        raise InputError(str(exc)) from None
    if text is None:
        raise InputError(f"the PNG carries no {MANIFEST_KEYWORD!r} text chunk")
    manifest = manifest_of(_parse_json(text.encode("utf-8")))
    image = _decode_png(data)
    digest = hashlib.sha256(rgb_array(image).tobytes()).hexdigest()
    recorded = [entry for entry in manifest["images"] if isinstance(entry, dict)]
    matches = [entry.get("index") for entry in recorded if entry.get("pixel_sha256") == digest]
    # Every PNG of a generation embeds the whole manifest, so the pixels say which image this is;
    # a one-image manifest whose hash does not match is still that image (compare reports the mismatch).
    if matches:
        index = matches[0]
    elif len(recorded) == 1:
        index = recorded[0].get("index")
    else:
        raise InputError(f"the pixels match none of the {len(recorded)} images of the embedded manifest")
    if not isinstance(index, int):
        raise InputError("the embedded manifest's image has no integer index")
    return ComparedItem(label, manifest, {index: image})


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"neither a PNG nor valid JSON: {exc}") from None


def _response_images(document: Mapping[str, Any]) -> dict[int, Image.Image]:
    images: dict[int, Image.Image] = {}
    for entry in document.get("images") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("png_base64"), str):
            continue
        if not isinstance(entry.get("index"), int):
            raise InputError("a response image has no integer index")
        try:
            png = base64.b64decode(entry["png_base64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"image {entry['index']}: png_base64 is not base64: {exc}") from None
        images[entry["index"]] = _decode_png(png)
    return images


def load_item(path: Path, label: str | None = None) -> ComparedItem:
    """Read one compare argument (manifest JSON, generation response JSON, or PNG); InputError names the file."""
    label = label or path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if data.startswith(PNG_SIGNATURE):
            return _png_item(label, data)
        document = _parse_json(data)
        manifest = manifest_of(document)
        # A /v1/generations response carries the PNGs too: use them for pixel drift.
        images = _response_images(document) if document is not manifest else {}
        return ComparedItem(label, manifest, images)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [path.name for path in paths]
    return [path.name if names.count(path.name) == 1 else str(path) for path in paths]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:_HEX_SHOWN] + "…"
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _column_letter(position: int) -> str:
    return chr(ord("A") + position) if position < 26 else f"#{position + 1}"


def _field_lines(rows: Sequence[FieldRow], name_width: int, widths: list[int]) -> list[str]:
    lines = []
    for row in rows:
        mark = "*" if row.differs else " "
        cells = "  ".join(_cell(value).ljust(width) for value, width in zip(row.values, widths, strict=True))
        lines.append(f"{mark} {row.field:<{name_width}}  {cells}".rstrip())
    return lines


def _image_lines(image: ImageAgreement) -> list[str]:
    seeds = list(dict.fromkeys(image.seeds))
    seed = f"seed {_cell(seeds[0])}" if len(seeds) == 1 else "seeds " + "/".join(map(_cell, image.seeds))
    latent = "same" if image.latent_agree else "DIFFER"
    pixel = "same" if image.pixel_agree else "DIFFER"
    lines = [f"image {image.index} ({seed}): latent hash {latent}, pixel hash {pixel}"]
    for pair in image.pixel_drift:
        drift = pair.drift
        if drift.identical:
            lines.append(f"    {pair.label} vs {pair.reference}: pixels identical")
        else:
            lines.append(
                f"    {pair.label} vs {pair.reference}: max abs {drift.max_abs}, mean abs {drift.mean_abs:.4f}, "
                f"PSNR {drift.psnr_db:.2f} dB, {drift.changed_fraction:.1%} of pixels changed"
            )
    return lines


def render_table(comparison: Comparison) -> str:
    """The readable report: items, key fields side by side (* marks a difference), verdicts, per-image hashes."""
    letters = [_column_letter(i) for i in range(len(comparison.labels))]
    lines = [
        f"{letter}  {label}  {_cell(gid)}  {key or '-'}"
        for letter, label, gid, key in zip(
            letters, comparison.labels, comparison.generation_ids, comparison.reproducibility_keys, strict=True
        )
    ]
    differing_request = [row for row in comparison.request if row.differs]
    shown = [*comparison.fields, *differing_request]
    name_width = max(len(row.field) for row in shown)
    widths = [max(1, *(len(_cell(row.values[i])) for row in shown)) for i in range(len(letters))]
    header = "  ".join(letter.ljust(width) for letter, width in zip(letters, widths, strict=True))
    lines += ["", f"  {'field':<{name_width}}  {header}".rstrip()]
    lines += _field_lines([row for row in comparison.fields if row.in_key], name_width, widths)
    informative = [row for row in comparison.fields if not row.in_key]
    if informative:
        lines.append("  (not in the key)")
        lines += _field_lines(informative, name_width, widths)
    if differing_request:
        lines.append("  (request)")
        lines += _field_lines(differing_request, name_width, widths)
    lines += ["(* marks a field whose values differ)", ""]

    key_diffs = [row.field for row in comparison.fields if row.in_key and row.differs]
    if any(name.startswith(FILES_FIELD + "[") for name in key_diffs):
        key_diffs.remove(FILES_FIELD)  # the per-file rows say more than the digest
    if comparison.key_same:
        lines.append("reproducibility key: same")
    else:
        lines.append("reproducibility key: different" + (f" ({', '.join(key_diffs)})" if key_diffs else ""))
    if comparison.request_same:
        lines.append("request: same")
    else:
        names = ", ".join(row.field for row in differing_request)
        lines.append(f"request: different ({names}): equal hashes are not expected")
    for image in comparison.images:
        lines += _image_lines(image)
    if comparison.notes:
        lines.append("notes:")
        lines += [f"  - {note}" for note in comparison.notes]

    if comparison.hashes_agree:
        lines.append("hashes: all agree")
    else:
        differing = ", ".join(str(i.index) for i in comparison.images if not (i.latent_agree and i.pixel_agree))
        lines.append(f"hashes: differ (image {differing or '-'})")
        if comparison.key_same and comparison.request_same:
            lines.append("the same request under one reproducibility key gave different bits: the contract is broken")
    return "\n".join(lines)


def run_compare(
    paths: Sequence[Path], *, as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Load 2+ files, compare them, print the table (or JSON); 0 hashes agree, 1 they differ, 2 bad input."""
    out, err = out or sys.stdout, err or sys.stderr
    if len(paths) < 2:
        print("sameseed compare: give at least two manifest or PNG files", file=err)
        return 2
    try:
        items = [load_item(path, label) for path, label in zip(paths, _labels(paths), strict=True)]
    except InputError as exc:
        print(f"sameseed compare: {exc}", file=err)
        return 2
    comparison = compare_manifests(items)
    if as_json:
        print(json.dumps(comparison.to_json(), indent=2, ensure_ascii=False, allow_nan=False), file=out)
    else:
        print(render_table(comparison), file=out)
    return 0 if comparison.hashes_agree else 1
