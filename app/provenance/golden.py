"""The golden suite and its baselines: expected hashes per (case, reproducibility key)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.pipeline.samplers import SamplerName
from app.store.files import write_atomic

log = logging.getLogger("app.golden")

EMBEDDED_SUITE = Path(__file__).resolve().parent / "golden.yaml"
BASELINES_FORMAT = "sameseed.baselines/1"
_CASE_NAME = r"^[a-z0-9][a-z0-9-]{0,63}$"


class GoldenCase(BaseModel):
    """One reference request; size comes from the model's defaults times the optional factors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=_CASE_NAME)]
    family: str
    prompt: str
    negative_prompt: str = ""
    seed: Annotated[int, Field(ge=0, le=2**53 - 1)]
    steps: Annotated[int, Field(ge=1, le=50)]
    guidance_scale: Annotated[float, Field(ge=0)]
    sampler: SamplerName
    width_factor: Annotated[float, Field(gt=0, le=4)] = 1.0
    height_factor: Annotated[float, Field(gt=0, le=4)] = 1.0
    # co-batched: render this image in one pipeline call with cobatch - 1 companions (seed + 1, ...) where the
    # worker proved that batch size, and judge it against the baseline of `cobatch_of`, its single-run twin
    cobatch: Annotated[int, Field(ge=1, le=16)] = 1
    cobatch_of: Annotated[str | None, Field(pattern=_CASE_NAME)] = None

    def size(self, default_width: int, default_height: int, multiple: int) -> tuple[int, int]:
        """Width and height for a model with these defaults, rounded to its size multiple."""

        def scaled(value: int, factor: float) -> int:
            return max(multiple, round(value * factor / multiple) * multiple)

        return scaled(default_width, self.width_factor), scaled(default_height, self.height_factor)


class GoldenSuite(BaseModel):
    """A versioned list of golden cases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[int, Field(ge=1)]
    cases: list[GoldenCase]

    def for_family(self, family: str) -> list[GoldenCase]:
        """The cases that apply to a model family."""
        return [case for case in self.cases if case.family == family]


def load_suite(path: Path = EMBEDDED_SUITE) -> GoldenSuite:
    """Parse a golden suite YAML file, raising ValueError with the reason."""
    try:
        return GoldenSuite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"invalid golden suite {path}: {exc}") from exc


class Baseline(BaseModel):
    """Expected hashes of one case under one reproducibility key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    case: Annotated[str, Field(pattern=_CASE_NAME)]
    suite_version: Annotated[int, Field(strict=True, ge=1)]  # strict: `false` is not version 0
    model: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]  # a registry id
    reproducibility_key: Annotated[str, Field(pattern=r"^rk1-[0-9a-f]{64}$")]
    latent_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    pixel_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    recorded_at: str
    recorded_by: str = ""


class BaselineDocument(BaseModel):
    """The export/import format of baselines (keep it in git, share it between servers)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sameseed.baselines/1"] = BASELINES_FORMAT
    baselines: list[Baseline]


@dataclass(frozen=True)
class CaseVerdict:
    """How one case's actual hashes compare to its baseline."""

    state: Literal["consistent", "baseline_recorded", "drifted"]
    expected: Baseline | None


class Baselines(Protocol):
    """Where baselines are kept: this JSON file store, or the shared ledger (app/store/baselines.py)."""

    def get(self, case: str, suite_version: int, key: str) -> Baseline | None:
        """The baseline of a case under a key, if recorded."""

    def judge(self, actual: Baseline) -> CaseVerdict:
        """Compare actual hashes with the baseline; record them as the baseline when there is none."""

    def export(self) -> BaselineDocument:
        """Every baseline, sorted."""

    def import_(self, document: BaselineDocument, *, replace: bool = False) -> int:
        """Merge (or replace all with) imported baselines; returns how many were written."""


class BaselineStore:
    """Baselines in one JSON file in the data dir, written atomically; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._items: dict[tuple[str, int, str], Baseline] = {}
        if path.exists():
            self._items = {self._key(b): b for b in self._read(path).baselines}

    @staticmethod
    def _key(b: Baseline) -> tuple[str, int, str]:
        return (b.case, b.suite_version, b.reproducibility_key)

    @staticmethod
    def _read(path: Path) -> BaselineDocument:
        try:
            return BaselineDocument.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ValueError(f"cannot read baselines {path}: {exc}") from exc

    def get(self, case: str, suite_version: int, key: str) -> Baseline | None:
        """The baseline of a case under a key, if recorded."""
        return self._items.get((case, suite_version, key))

    def judge(self, actual: Baseline) -> CaseVerdict:
        """Compare actual hashes with the baseline; record them as the baseline when there is none."""
        with self._lock:
            expected = self._items.get(self._key(actual))
            if expected is None:
                self._items[self._key(actual)] = actual
                try:
                    self._write()
                except OSError as exc:  # the verdict stands; the baseline is kept in memory until a write works
                    log.error("cannot write golden baselines to %s: %s", self.path, exc)
                return CaseVerdict("baseline_recorded", None)
        same = (expected.latent_sha256, expected.pixel_sha256) == (actual.latent_sha256, actual.pixel_sha256)
        return CaseVerdict("consistent" if same else "drifted", expected)

    def export(self) -> BaselineDocument:
        """Every baseline, sorted."""
        with self._lock:
            items = sorted(self._items.values(), key=lambda b: (b.reproducibility_key, b.suite_version, b.case))
        return BaselineDocument(baselines=items)

    def import_(self, document: BaselineDocument, *, replace: bool = False) -> int:
        """Merge (or replace all with) imported baselines; returns how many were written."""
        with self._lock:
            if replace:
                self._items = {}
            for baseline in document.baselines:
                self._items[self._key(baseline)] = baseline
            self._write()
        return len(document.baselines)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        items = sorted(self._items.values(), key=lambda b: (b.reproducibility_key, b.suite_version, b.case))
        data = BaselineDocument(baselines=items).model_dump(mode="json")
        write_atomic({self.path: json.dumps(data, indent=1, sort_keys=True).encode("utf-8")})


def summarize(states: list[str]) -> str:
    """Overall state of a set of case or worker states: drifted > unchecked > baseline_recorded > consistent."""
    for state in ("drifted", "unchecked", "baseline_recorded"):
        if state in states:
            return state
    return "consistent" if states else "unchecked"

