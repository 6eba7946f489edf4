"""The service's domain values: a generation's parameters, an image's hashes, a golden case's verdict.

Every layer uses these: the route converts the HTTP request into `GenerationParams`, the scheduler
queues them, the worker renders them, the manifest records them; `ImageHashes` is the base of every
per-image record (manifest image, ledger row, HTTP answer). Both are pydantic dataclasses: plain,
picklable dataclasses for the worker pipe that validate (and refuse unknown fields) when built from
JSON, as a manifest is.
"""

from __future__ import annotations

import dataclasses

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")
MAX_SEED = 2**53 - 1  # JavaScript clients keep every integer up to here exact


@dataclass(frozen=True, config=STRICT)
class GenerationParams:
    """Every effective parameter of a generation, defaults filled in; image k uses seed + k."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str
    num_images: int

    def image(self, index: int) -> GenerationParams:
        """The parameters of image `index` made on its own: seed + index, one image."""
        return dataclasses.replace(self, seed=self.seed + index, num_images=1)

    def as_dict(self) -> dict[str, object]:
        """The parameters as a plain dict (field order kept)."""
        return dataclasses.asdict(self)

    def cobatch_key(self) -> tuple[object, ...]:
        """What images must share to run in one co-batched pipeline call (prompts and seeds may differ)."""
        # SDXL conditions an empty negative prompt on zeros, a non-empty one on its encoding: not mixable
        return (self.model, self.width, self.height, self.steps, self.sampler, self.guidance_scale,
                self.negative_prompt == "")


@dataclass(frozen=True, config=STRICT)
class ImageHashes:
    """One image's identity: its index and seed, its size and the hashes anyone can recompute."""

    index: int
    seed: int
    latent_sha256: str
    pixel_sha256: str
    width: int
    height: int

    def hash_fields(self) -> dict[str, int | str]:
        """Just the ImageHashes fields of this record (of any subclass), to build another record from."""
        return {name: getattr(self, name) for name in ImageHashes.__dataclass_fields__}


@dataclass(frozen=True)
class CaseResult:
    """One golden case on one worker: the verdict, expected vs actual hashes, and the error if it failed."""

    case: str
    model: str
    reproducibility_key: str | None
    state: str
    expected_latent_sha256: str | None
    actual_latent_sha256: str | None
    expected_pixel_sha256: str | None
    actual_pixel_sha256: str | None
    error: str | None = None
    cobatched_with: int | None = None  # a co-batched case: how many other images shared its pipeline call
