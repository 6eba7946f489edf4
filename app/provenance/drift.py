"""Drift between generations: which reproducibility-key fields differ, and by how much bits moved.

Pure functions over manifest dicts, numpy arrays and PIL images; nothing here imports torch, so the
HTTP process and the offline `compare` command can use it.

JSON convention: a PSNR of identical pixels is infinite and serialises as `null` (with
`"identical": true` beside it), because canonical JSON refuses Infinity.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy
from PIL import Image

from app.provenance.key import KEY_RUNTIME_FIELDS, KEY_VERSION, KEY_VERSION_FIELDS, reproducibility_key
from app.provenance.manifest import canonical_json

FILES_FIELD = "model.files"

# The order of the key document in app/provenance/key.py: model identity, runtime, versions.
KEY_FIELD_NAMES: tuple[str, ...] = (
    FILES_FIELD,
    "model.pipeline",
    "model.dtype",
    *(f"runtime.{name}" for name in KEY_RUNTIME_FIELDS),
    *(f"versions.{name}" for name in KEY_VERSION_FIELDS),
)
# Shown to explain a difference, but they do not enter the key (a change here promises nothing).
INFORMATIVE_FIELD_NAMES: tuple[str, ...] = (
    "versions.python",
    "versions.numpy",
    "versions.pillow",
    "versions.safetensors",
    "versions.sameseed",
    "runtime.cublas_workspace_config",
)

# What a request asked for: when these differ, equal hashes were never expected.
REQUEST_FIELD_NAMES: tuple[str, ...] = (
    "request.model",
    "request.prompt",
    "request.negative_prompt",
    "request.seed",
    "request.steps",
    "request.guidance_scale",
    "request.width",
    "request.height",
    "request.sampler",
    "request.num_images",
    "scheduler.class_name",
    "scheduler.config",
    "conditioning",
)


def file_field(path: str) -> str:
    """The field name of one model file in a difference list, e.g. `model.files[unet/x.safetensors]`."""
    return f"{FILES_FIELD}[{path}]"


def in_key(name: str) -> bool:
    """Whether a field name (including a per-file `model.files[...]` name) enters the reproducibility key."""
    return name in KEY_FIELD_NAMES or name.startswith(FILES_FIELD + "[")


def _section(manifest: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = manifest.get(name)
    return value if isinstance(value, Mapping) else {}


def _files(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    files = _section(manifest, "model").get("files")
    return files if isinstance(files, Mapping) else None


def files_digest(files: Mapping[str, Any] | None) -> str | None:
    """sha256 hex of the canonical JSON of the sorted files map (one identity for all model files); None if absent."""
    if files is None:
        return None
    return hashlib.sha256(canonical_json(dict(sorted(files.items())))).hexdigest()


def _lookup(manifest: Mapping[str, Any], name: str) -> Any:
    section, _, leaf = name.partition(".")
    if section == "versions":
        return _section(_section(manifest, "runtime"), "versions").get(leaf)
    value = _section(manifest, section).get(leaf) if leaf else manifest.get(section)
    # Nested documents (a scheduler config, conditioning) compare by their canonical digest.
    if isinstance(value, Mapping | list):
        return hashlib.sha256(canonical_json(value)).hexdigest()
    return value


def key_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened key fields in key order, then informative non-key fields (see `in_key`); absent values are None.

    `model.files` is the digest of the whole files map (`files_digest`); `key_differences` names the files.
    """
    fields: dict[str, Any] = {FILES_FIELD: files_digest(_files(manifest))}
    for name in KEY_FIELD_NAMES[1:] + INFORMATIVE_FIELD_NAMES:
        fields[name] = _lookup(manifest, name)
    image = _section(manifest, "runtime").get("image")
    if isinstance(image, Mapping):  # the container image: version, revision, base, each shown on its own
        for leaf in sorted(image):
            fields[f"runtime.image.{leaf}"] = image[leaf]
    elif image is not None:
        fields["runtime.image"] = image
    return fields


def request_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened request, scheduler and conditioning fields; nested documents as sha256 of their canonical JSON."""
    return {name: _lookup(manifest, name) for name in REQUEST_FIELD_NAMES}


@dataclass(frozen=True)
class FieldDifference:
    """One field whose values differ between two manifests."""

    field: str
    a: Any
    b: Any
    in_key: bool

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return {"field": self.field, "a": self.a, "b": self.b, "in_key": self.in_key}


def file_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[FieldDifference]:
    """Per-file differences of two manifests' model files (None where a side lacks the file), sorted by path."""
    files_a, files_b = _files(a) or {}, _files(b) or {}
    return [
        FieldDifference(file_field(path), files_a.get(path), files_b.get(path), in_key=True)
        for path in sorted(set(files_a) | set(files_b))
        if files_a.get(path) != files_b.get(path)
    ]


def key_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[FieldDifference]:
    """Fields that differ between two manifests, in key order then informative; model files named one by one."""
    fields_a, fields_b = key_fields(a), key_fields(b)
    differences: list[FieldDifference] = []
    for name in dict.fromkeys([*fields_a, *fields_b]):
        value_a, value_b = fields_a.get(name), fields_b.get(name)
        if value_a == value_b:
            continue
        if name == FILES_FIELD:
            # The digest says only "something differs"; the caller needs to know which file.
            differences.extend(file_differences(a, b) or [FieldDifference(name, value_a, value_b, in_key=True)])
        else:
            differences.append(FieldDifference(name, value_a, value_b, in_key=in_key(name)))
    return differences


def recomputed_key(manifest: Mapping[str, Any]) -> str | None:
    """The reproducibility key recomputed from the manifest's own fields; None when the model part is missing."""
    model = _section(manifest, "model")
    files = _files(manifest)
    if files is None or not isinstance(model.get("pipeline"), str) or not isinstance(model.get("dtype"), str):
        return None
    return reproducibility_key(
        files=files, pipeline=model["pipeline"], dtype=model["dtype"], runtime=_section(manifest, "runtime")
    )


@dataclass(frozen=True)
class LatentDrift:
    """Absolute difference of two latent arrays, over the positions where both values are finite."""

    max_abs: float
    mean_abs: float
    nonfinite: int = 0  # positions where a NaN/Inf on either side is not matched on the other

    @property
    def identical(self) -> bool:
        """Equal values everywhere (NaN matching NaN)."""
        return self.max_abs == 0.0 and self.nonfinite == 0

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return {
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "nonfinite": self.nonfinite,
            "identical": self.identical,
        }


def latent_drift(a: numpy.ndarray, b: numpy.ndarray) -> LatentDrift:
    """Max and mean absolute difference in float64; ValueError when the shapes differ."""
    left, right = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    if left.shape != right.shape:
        raise ValueError(f"latent shapes differ: {left.shape} vs {right.shape}")
    finite = numpy.isfinite(left) & numpy.isfinite(right)
    # fp16 VAEs and broken kernels produce NaN/Inf; count a mismatch instead of poisoning the mean.
    same_nonfinite = (left == right) | (numpy.isnan(left) & numpy.isnan(right))
    nonfinite = int(numpy.count_nonzero(~finite & ~same_nonfinite))
    if not finite.any():
        return LatentDrift(0.0, 0.0, nonfinite)
    diff = numpy.abs(left[finite] - right[finite])
    return LatentDrift(float(diff.max()), float(diff.mean()), nonfinite)


@dataclass(frozen=True)
class PixelDrift:
    """Difference of two images as RGB uint8: max/mean absolute channel difference and PSNR."""

    max_abs: int
    mean_abs: float
    psnr_db: float  # math.inf when identical; to_json writes null
    changed_fraction: float  # share of pixels with at least one channel different

    @property
    def identical(self) -> bool:
        """Bitwise-equal pixels."""
        return self.max_abs == 0

    def to_json(self) -> dict[str, Any]:
        """A plain dict; `psnr_db` is null when the pixels are identical (infinite PSNR)."""
        return {
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,
            "changed_fraction": self.changed_fraction,
            "identical": self.identical,
        }


def rgb_array(image: Image.Image | numpy.ndarray) -> numpy.ndarray:
    """An image as an (H, W, 3) uint8 array, converted like pixel_sha256; ValueError for non-uint8 arrays."""
    if isinstance(image, Image.Image):
        return numpy.asarray(image.convert("RGB"), dtype=numpy.uint8)
    array = numpy.asarray(image)
    if array.dtype != numpy.uint8:
        # Casting floats would invent a quantisation the hashes never saw.
        raise ValueError(f"pixel arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return numpy.asarray(Image.fromarray(array).convert("RGB"), dtype=numpy.uint8)
    raise ValueError(f"pixel arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")


def pixel_drift(a: Image.Image | numpy.ndarray, b: Image.Image | numpy.ndarray) -> PixelDrift:
    """Compare two images as RGB uint8; PSNR = 10·log10(255² / MSE), inf when identical; ValueError on size mismatch."""
    left, right = rgb_array(a), rgb_array(b)
    if left.shape != right.shape:
        raise ValueError(f"image sizes differ: {left.shape[1]}x{left.shape[0]} vs {right.shape[1]}x{right.shape[0]}")
    diff = numpy.abs(left.astype(numpy.int16) - right.astype(numpy.int16))
    if diff.size == 0:
        return PixelDrift(0, 0.0, math.inf, 0.0)
    mse = float(numpy.mean(diff.astype(numpy.float64) ** 2))
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)
    changed = float(numpy.count_nonzero(diff.any(axis=2))) / (diff.shape[0] * diff.shape[1])
    return PixelDrift(int(diff.max()), float(diff.mean()), psnr, changed)


@dataclass
class ComparedItem:
    """One generation to compare: a label, its manifest, and the decoded images we have, by image index."""

    label: str
    manifest: Mapping[str, Any]
    images: dict[int, Image.Image] = field(default_factory=dict)


@dataclass(frozen=True)
class FieldRow:
    """One field side by side across all compared items."""

    field: str
    values: list[Any]
    in_key: bool

    @property
    def differs(self) -> bool:
        """Not every item has the same value."""
        return any(value != self.values[0] for value in self.values[1:])

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return {"field": self.field, "values": list(self.values), "in_key": self.in_key, "differs": self.differs}


def _all_equal(values: Sequence[Any]) -> bool:
    # A missing value (None) never agrees: an absent hash proves nothing.
    return None not in values and all(value == values[0] for value in values[1:])


@dataclass(frozen=True)
class PairDrift:
    """Pixel drift of one item's image against the reference item's image at the same index."""

    label: str
    reference: str
    drift: PixelDrift

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return {"label": self.label, "reference": self.reference, **self.drift.to_json()}


@dataclass(frozen=True)
class ImageAgreement:
    """Hashes of one image index across items (None where an item lacks the index) and pixel drift."""

    index: int
    seeds: list[int | None]
    latent_sha256: list[str | None]
    pixel_sha256: list[str | None]
    pixel_drift: list[PairDrift] = field(default_factory=list)

    @property
    def latent_agree(self) -> bool:
        """Every item recorded the same latent hash for this index."""
        return _all_equal(self.latent_sha256)

    @property
    def pixel_agree(self) -> bool:
        """Every item recorded the same pixel hash for this index."""
        return _all_equal(self.pixel_sha256)

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return {
            "index": self.index,
            "seeds": list(self.seeds),
            "latent_sha256": list(self.latent_sha256),
            "pixel_sha256": list(self.pixel_sha256),
            "latent_agree": self.latent_agree,
            "pixel_agree": self.pixel_agree,
            "pixel_drift": [pair.to_json() for pair in self.pixel_drift],
        }


@dataclass(frozen=True)
class Comparison:
    """Key fields side by side, request differences, and per-image hash agreement of 2+ generations."""

    labels: list[str]
    generation_ids: list[str | None]
    reproducibility_keys: list[str | None]
    fields: list[FieldRow]
    request: list[FieldRow]
    images: list[ImageAgreement]
    notes: list[str] = field(default_factory=list)

    @property
    def key_same(self) -> bool:
        """Same recorded reproducibility key everywhere and no key field differs."""
        keys = self.reproducibility_keys
        return _all_equal(keys) and not any(r.in_key and r.differs for r in self.fields)

    @property
    def request_same(self) -> bool:
        """Every item asked for the same generation (request, scheduler, conditioning)."""
        return not any(row.differs for row in self.request)

    @property
    def hashes_agree(self) -> bool:
        """Every image index has equal latent and pixel hashes in every item."""
        return bool(self.images) and all(i.latent_agree and i.pixel_agree for i in self.images)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (PSNR of identical pixels is null)."""
        return {
            "labels": list(self.labels),
            "generation_ids": list(self.generation_ids),
            "reproducibility_keys": list(self.reproducibility_keys),
            "key_same": self.key_same,
            "request_same": self.request_same,
            "hashes_agree": self.hashes_agree,
            "fields": [row.to_json() for row in self.fields],
            "request": [row.to_json() for row in self.request],
            "images": [image.to_json() for image in self.images],
            "notes": list(self.notes),
        }


def _columns(per_item: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    names = dict.fromkeys(name for fields in per_item for name in fields)
    return {name: [fields.get(name) for fields in per_item] for name in names}


def _rows(items: Sequence[ComparedItem]) -> list[FieldRow]:
    rows: list[FieldRow] = []
    for name, values in _columns([key_fields(item.manifest) for item in items]).items():
        rows.append(FieldRow(name, values, in_key(name)))
        if name == FILES_FIELD and rows[-1].differs:
            # Right under the digest, name the files that differ (absent files show as None).
            per_file = _columns([_files(item.manifest) or {} for item in items])
            for path, values in sorted(per_file.items()):
                if any(value != values[0] for value in values[1:]):
                    rows.append(FieldRow(file_field(path), values, in_key=True))
    return rows


def _images_by_index(manifest: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    images = manifest.get("images")
    return {
        image["index"]: image
        for image in (images if isinstance(images, list) else [])
        if isinstance(image, Mapping) and isinstance(image.get("index"), int)
    }


def _agreements(items: Sequence[ComparedItem], notes: list[str]) -> list[ImageAgreement]:
    recorded = [_images_by_index(item.manifest) for item in items]
    indices = sorted({index for images in recorded for index in images} | {i for it in items for i in it.images})
    agreements = []
    for index in indices:
        entries = [images.get(index, {}) for images in recorded]
        drifts: list[PairDrift] = []
        holders = [item for item in items if index in item.images]
        for item in holders[1:]:
            try:
                drift = pixel_drift(holders[0].images[index], item.images[index])
                drifts.append(PairDrift(item.label, holders[0].label, drift))
            except ValueError as exc:
                notes.append(f"image {index}: no pixel drift for {item.label} vs {holders[0].label}: {exc}")
        agreements.append(
            ImageAgreement(
                index=index,
                seeds=[entry.get("seed") for entry in entries],
                latent_sha256=[entry.get("latent_sha256") for entry in entries],
                pixel_sha256=[entry.get("pixel_sha256") for entry in entries],
                pixel_drift=drifts,
            )
        )
    return agreements


def _item_notes(item: ComparedItem) -> list[str]:
    notes = []
    recorded = _section(item.manifest, "runtime").get("reproducibility_key")
    recomputed = recomputed_key(item.manifest)
    if not isinstance(recorded, str):
        notes.append(f"{item.label}: the manifest records no reproducibility key")
    elif recorded.startswith(KEY_VERSION + "-") and recomputed is not None and recorded != recomputed:
        # A key its own fields do not reproduce means an edited or inconsistent manifest.
        notes.append(f"{item.label}: the recorded reproducibility key does not match the manifest's key fields")
    recorded_images = _images_by_index(item.manifest)
    for index, image in sorted(item.images.items()):
        actual = hashlib.sha256(rgb_array(image).tobytes()).hexdigest()
        if recorded_images.get(index, {}).get("pixel_sha256") != actual:
            notes.append(f"{item.label}: the pixels of image {index} do not hash to its manifest's pixel_sha256")
    return notes


def compare_manifests(items: Sequence[ComparedItem]) -> Comparison:
    """Compare 2+ generations: key and request fields side by side, hash agreement and pixel drift per image index."""
    if len(items) < 2:
        raise ValueError(f"comparison needs at least 2 generations, got {len(items)}")
    notes = [note for item in items for note in _item_notes(item)]
    keys = [_section(item.manifest, "runtime").get("reproducibility_key") for item in items]
    ids = [item.manifest.get("id") for item in items]
    request = _columns([request_fields(item.manifest) for item in items])
    return Comparison(
        labels=[item.label for item in items],
        generation_ids=[value if isinstance(value, str) else None for value in ids],
        reproducibility_keys=[value if isinstance(value, str) else None for value in keys],
        fields=_rows(items),
        request=[FieldRow(name, values, in_key=False) for name, values in request.items()],
        images=_agreements(items, notes),
        notes=notes,
    )
