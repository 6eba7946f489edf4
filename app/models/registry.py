"""The model registry: which models a server may load, from where, with which defaults and limits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.pipeline.samplers import SamplerName

_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_REVISION = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Diffusers-format config folders shipped with Sameseed for single-file checkpoints, by family.
EMBEDDED_CONFIGS = Path(__file__).resolve().parent / "configs"
SINGLE_FILE_CONFIGS: dict[str, str] = {"sd1": "sd15"}


class RegistryError(ValueError):
    """The registry file is missing, malformed, or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """A Hugging Face Hub repository pinned to one commit."""

    repo: Annotated[str, Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")]
    revision: str
    filename: Annotated[
        str | None,
        Field(description="One single-file checkpoint in the repo (e.g. v1-5-pruned-emaonly-fp16.safetensors)."),
    ] = None

    @model_validator(mode="after")
    def _pinned(self) -> HubSource:
        if not _REVISION.match(self.revision):
            raise ValueError(
                f"hub revision must be a full 40-hex commit sha (branches and tags move); got {self.revision!r}"
            )
        if self.filename is not None:
            _check_single_file(self.filename)
        return self


def _check_single_file(path: str) -> None:
    if not path.endswith(".safetensors"):
        raise ValueError(f"a single-file checkpoint must be .safetensors (pickles are refused); got {path!r}")


class ModelSource(_Strict):
    """Exactly one of: a local diffusers folder, a pinned hub repo, a builtin builder, or a single file.

    A single-file checkpoint (``single_file``, or ``hub`` with a ``filename``) is read with a
    diffusers-format ``config`` folder; absent, the one Sameseed ships for the model's family.
    """

    local: str | None = None
    hub: HubSource | None = None
    build: str | None = None
    single_file: str | None = None
    config: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [name for name in ("local", "hub", "build", "single_file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"source needs exactly one of local, hub, build, single_file; got {given or 'none'}")
        if self.single_file is not None:
            _check_single_file(self.single_file)
        if self.config is not None and not self.is_single_file:
            raise ValueError("source config is only for single-file checkpoints (single_file, or hub with filename)")
        return self

    @property
    def kind(self) -> str:
        """The source kind: local, hub, build or single_file."""
        if self.single_file is not None:
            return "single_file"
        return "local" if self.local is not None else "hub" if self.hub is not None else "build"

    @property
    def is_single_file(self) -> bool:
        """Whether the weights come as one original-layout checkpoint file (local or from the hub)."""
        return self.single_file is not None or (self.hub is not None and self.hub.filename is not None)


class VaeSource(_Strict):
    """A replacement VAE (e.g. the SDXL fp16-fix VAE): exactly one of a local diffusers folder or a hub repo."""

    local: str | None = None
    hub: HubSource | None = None
    subfolder: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VaeSource:
        given = [name for name in ("local", "hub") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"vae needs exactly one of local, hub; got {given or 'none'}")
        if self.hub is not None and self.hub.filename is not None:
            raise ValueError("a replacement vae is a diffusers folder (config.json + safetensors), not a single file")
        return self


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
    family: Literal["sd1", "sdxl"]
    description: str = ""
    source: ModelSource
    vae: Annotated[
        VaeSource | None,
        Field(description="A replacement VAE; its files enter the manifest as vae_override/<path>."),
    ] = None
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
        if self.source.is_single_file and self.family not in SINGLE_FILE_CONFIGS:
            raise ValueError(
                f"single-file checkpoints load for families {sorted(SINGLE_FILE_CONFIGS)}; "
                f"register a {self.family} model as a diffusers folder (local) or hub repo"
            )
        return self

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class this family loads with."""
        return {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[self.family]


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
        """Where a local or built model (or a local single-file checkpoint) lives; None for hub models."""
        if entry.source.local is not None:
            return self.resolve(entry.source.local)
        if entry.source.single_file is not None:
            return self.resolve(entry.source.single_file)
        if entry.source.build is not None:
            return (data_dir / "models" / entry.id).resolve()
        return None

    def config_folder(self, entry: ModelEntry) -> Path | None:
        """The diffusers-format config folder of a single-file model (the shipped one by default); else None."""
        if not entry.source.is_single_file:
            return None
        if entry.source.config is not None:
            return self.resolve(entry.source.config)
        return EMBEDDED_CONFIGS / SINGLE_FILE_CONFIGS[entry.family]

    def resolve(self, path: str) -> Path:
        """A registry path: absolute as written (after ~), else relative to the registry file's folder."""
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else (self.base_dir / resolved).resolve()


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
