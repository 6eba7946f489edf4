"""The model registry: which models a server may load, from where, with which defaults and limits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.samplers import SamplerName

_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_REVISION = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(ValueError):
    """The registry file is missing, malformed, or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """A Hugging Face Hub repository pinned to one commit."""

    repo: Annotated[str, Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")]
    revision: str

    @model_validator(mode="after")
    def _pinned(self) -> HubSource:
        if not _REVISION.match(self.revision):
            raise ValueError(
                f"hub revision must be a full 40-hex commit sha (branches and tags move); got {self.revision!r}"
            )
        return self


class ModelSource(_Strict):
    """Exactly one of: a local diffusers folder, a pinned hub repo, or a builtin builder."""

    local: str | None = None
    hub: HubSource | None = None
    build: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [name for name in ("local", "hub", "build") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"source needs exactly one of local, hub, build; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        """The source kind: local, hub or build."""
        return "local" if self.local is not None else "hub" if self.hub is not None else "build"


class ModelDefaults(_Strict):
    """Parameters a request gets when it leaves them out."""

    width: Annotated[int, Field(ge=8)]
    height: Annotated[int, Field(ge=8)]
    steps: Annotated[int, Field(ge=1)] = 20
    guidance_scale: Annotated[float, Field(ge=0)] = 7.5
    sampler: SamplerName = "pndm"


class ModelLimits(_Strict):
    """Bounds a request must stay within for this model."""

    size_multiple: Annotated[int, Field(ge=1)] = 8
    min_size: Annotated[int, Field(ge=8)] = 8
    max_size: Annotated[int, Field(ge=8)] = 2048
    max_pixels: Annotated[int, Field(ge=64)] = 1024 * 1024
    max_steps: Annotated[int, Field(ge=1)] = 150
    max_guidance_scale: Annotated[float, Field(gt=0)] = 30.0


class ModelEntry(_Strict):
    """One registered model."""

    id: Annotated[str, Field(pattern=_ID_PATTERN)]
    family: Literal["sd1"]
    description: str = ""
    source: ModelSource
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    defaults: ModelDefaults
    limits: ModelLimits = ModelLimits()
    sha256: dict[str, str] = Field(
        default_factory=dict, description="Pinned sha256 per component file (relative path)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        for path, digest in self.sha256.items():
            if not _SHA256.match(digest):
                raise ValueError(f"sha256 pin for {path!r} is not 64 lowercase hex digits")
        lim, d = self.limits, self.defaults
        for name in ("width", "height"):
            value = getattr(d, name)
            if value % lim.size_multiple or not lim.min_size <= value <= lim.max_size:
                raise ValueError(f"default {name} {value} breaks the model's own limits")
        if d.width * d.height > lim.max_pixels or d.steps > lim.max_steps:
            raise ValueError("defaults exceed the model's own limits")
        return self

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class this family loads with."""
        return {"sd1": "StableDiffusionPipeline"}[self.family]


class Registry(_Strict):
    """A parsed registry file; paths in it are relative to the file's folder."""

    version: Literal[1]
    default_model: str
    models: list[ModelEntry]
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _unique(self) -> Registry:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {duplicates}")
        if self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not among the models {ids}")
        return self

    def get(self, model_id: str) -> ModelEntry | None:
        """The entry with this id, or None."""
        return next((m for m in self.models if m.id == model_id), None)

    def local_folder(self, entry: ModelEntry, data_dir: Path) -> Path | None:
        """Where a local or built model lives on disk; None for hub models (resolved by the loader)."""
        if entry.source.local is not None:
            path = Path(entry.source.local).expanduser()
            return path if path.is_absolute() else (self.base_dir / path).resolve()
        if entry.source.build is not None:
            return (data_dir / "models" / entry.id).resolve()
        return None


def load_registry(path: Path) -> Registry:
    """Parse and validate a registry YAML/JSON file, raising RegistryError with the reason."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read model registry {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"model registry {path} must be a mapping at the top level")
    try:
        return Registry.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise RegistryError(f"invalid model registry {path}: {exc}") from exc
