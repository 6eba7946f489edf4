"""Model loading: the only module that imports diffusers. Verifies every file before loading it."""

from __future__ import annotations

import fcntl
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelUnavailable
from app.provenance.hashes import file_sha256
from app.registry import ModelEntry, Registry
from app.samplers import SAMPLERS

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_SKIPPED_FILES = {".gitattributes", "README.md", ".DS_Store"}


@dataclass
class LoadedModel:
    """A loaded pipeline plus the identity recorded in every manifest it produces."""

    entry: ModelEntry
    folder: Path
    pipe: Any
    files: dict[str, str]
    scheduler_config: dict[str, Any]
    device: str

    def identity(self) -> dict[str, Any]:
        """The manifest's `model` section (without nothing request-specific)."""
        hub = self.entry.source.hub
        return {
            "id": self.entry.id,
            "family": self.entry.family,
            "source_kind": self.entry.source.kind,
            "source": str(self.folder),
            "hub_repo": hub.repo if hub else None,
            "hub_revision": hub.revision if hub else None,
            "pipeline": type(self.pipe).__name__,
            "dtype": self.entry.dtype,
            "files": self.files,
            "scheduler_config": self.scheduler_config,
        }


def resolve_folder(entry: ModelEntry, registry: Registry, data_dir: Path, allow_download: bool) -> Path:
    """Find (building or fetching when allowed) the local diffusers folder of a registered model."""
    if entry.source.hub is not None:
        return _hub_snapshot(entry, data_dir, allow_download)
    folder = registry.local_folder(entry, data_dir)
    assert folder is not None
    if entry.source.build is not None:
        _build_once(entry.source.build, folder)
    if not (folder / "model_index.json").is_file():
        raise ModelUnavailable(
            f"model {entry.id!r}: no diffusers folder (model_index.json) at {folder}", param="model"
        )
    return folder


def _build_once(builder: str, folder: Path) -> None:
    if (folder / "model_index.json").is_file():
        return
    from app.models.build import build_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may start at once; one builds
        if not (folder / "model_index.json").is_file():
            log.info("building model %s into %s", builder, folder)
            build_model(builder, folder)


def _hub_snapshot(entry: ModelEntry, data_dir: Path, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = entry.source.hub
    assert hub is not None
    try:
        path = snapshot_download(
            repo_id=hub.repo,
            revision=hub.revision,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
            local_files_only=not allow_download,
        )
    except LocalEntryNotFoundError as exc:
        raise ModelUnavailable(
            f"model {entry.id!r} ({hub.repo}@{hub.revision}) is not in the local cache and "
            "SAMESEED_ALLOW_DOWNLOAD is off",
            param="model",
        ) from exc
    except Exception as exc:  # network, auth, missing revision: all make the model unavailable
        raise ModelUnavailable(f"model {entry.id!r}: cannot fetch {hub.repo}: {exc}", param="model") from exc
    return Path(path)


def verify_files(entry: ModelEntry, folder: Path) -> dict[str, str]:
    """Hash every file; refuse pickled weights and any file whose pinned sha256 differs."""
    files: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name in _SKIPPED_FILES or path.name.startswith(".") or "/." in f"/{rel}":
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelUnavailable(
                f"model {entry.id!r}: refusing pickled weights file {rel}; only safetensors load",
                param="model",
            )
        files[rel] = file_sha256(path)
    for rel, expected in sorted(entry.sha256.items()):
        actual = files.get(rel)
        if actual is None:
            raise ModelUnavailable(
                f"model {entry.id!r}: pinned file {rel} is missing from {folder}", param="model"
            )
        if actual != expected:
            raise ModelUnavailable(
                f"model {entry.id!r}: sha256 of {rel} is {actual}, registry pins {expected}; refusing to load",
                param="model",
            )
    if not any(rel.endswith(".safetensors") for rel in files):
        raise ModelUnavailable(f"model {entry.id!r}: no safetensors weights in {folder}", param="model")
    return files


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advisories; Sameseed logs what matters."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(entry: ModelEntry, folder: Path, device: str) -> LoadedModel:
    """Verify and load a registered model onto `device` in its registry dtype."""
    import diffusers
    import torch

    files = verify_files(entry, folder)
    pipeline_cls = getattr(diffusers, entry.pipeline_class)
    pipe = pipeline_cls.from_pretrained(
        folder,
        dtype=getattr(torch, entry.dtype),
        use_safetensors=True,
        low_cpu_mem_usage=False,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # Files are re-hashed after loading so a swap during the load cannot go unrecorded.
    if verify_files(entry, folder) != files:
        raise ModelUnavailable(f"model {entry.id!r}: files changed while loading", param="model")
    return LoadedModel(
        entry=entry,
        folder=folder,
        pipe=pipe,
        files=files,
        scheduler_config=json_config(pipe.scheduler.config),
        device=device,
    )


def json_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data (tuples become lists, private keys dropped)."""
    plain = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(plain, sort_keys=True, default=list))


def make_scheduler(model: LoadedModel, sampler: str) -> Any:
    """A fresh scheduler for one request, from the model's own config plus the sampler's overrides."""
    import diffusers

    spec = SAMPLERS[sampler]
    cls = getattr(diffusers, spec.scheduler_class)
    return cls.from_config(model.scheduler_config, **dict(spec.overrides))


def pipeline_view(model: LoadedModel, scheduler: Any) -> Any:
    """A per-request pipeline sharing the model's modules but owning its scheduler."""
    components = dict(model.pipe.components)
    components["scheduler"] = scheduler
    view = type(model.pipe)(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return view
