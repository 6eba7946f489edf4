"""Model loading: the only module that imports diffusers. Verifies every file before loading it."""

from __future__ import annotations

import fcntl
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelUnavailable
from app.models.registry import ModelEntry, Registry
from app.pipeline.families import FAMILIES
from app.pipeline.hashcache import file_sha256_once
from app.pipeline.samplers import SAMPLERS

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_SKIPPED_FILES = {".gitattributes", "README.md", ".DS_Store"}
# The two files AutoencoderKL.from_pretrained reads from a replacement VAE folder.
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Prefixes of files in `model.files` that are not in the model's own folder.
CONFIG_PREFIX, VAE_PREFIX = "config/", "vae_override/"


@dataclass(frozen=True)
class ModelPaths:
    """Where a registered model is on disk: its weights, plus a config folder and a replacement VAE if used."""

    source: Path  # a diffusers folder, or a single-file checkpoint
    config: Path | None = None  # the diffusers-format config folder a single-file checkpoint loads with
    vae: Path | None = None  # the diffusers folder of a replacement VAE

    def __str__(self) -> str:
        return str(self.source)


@dataclass
class LoadedModel:
    """A loaded pipeline plus the identity recorded in every manifest it produces."""

    entry: ModelEntry
    paths: ModelPaths
    pipe: Any
    files: dict[str, str]
    scheduler_config: dict[str, Any]
    device: str

    def identity(self) -> dict[str, Any]:
        """The manifest's `model` section (nothing request-specific)."""
        hub = self.entry.source.hub
        return {
            "id": self.entry.id,
            "family": self.entry.family,
            "source_kind": self.entry.source.kind,
            "source": str(self.paths.source),
            "hub_repo": hub.repo if hub else None,
            "hub_revision": hub.revision if hub else None,
            "hub_filename": hub.filename if hub else None,
            "config_source": str(self.paths.config) if self.paths.config else None,
            "vae_source": str(self.paths.vae) if self.paths.vae else None,
            "pipeline": type(self.pipe).__name__,
            "dtype": self.entry.dtype,
            "files": self.files,
            "scheduler_config": self.scheduler_config,
        }


def resolve_paths(entry: ModelEntry, registry: Registry, data_dir: Path, allow_download: bool) -> ModelPaths:
    """Find (building or fetching when allowed) every file location a registered model loads from."""
    return ModelPaths(
        source=_resolve_source(entry, registry, data_dir, allow_download),
        config=registry.config_folder(entry),
        vae=_resolve_vae(entry, registry, data_dir, allow_download),
    )


def _resolve_source(entry: ModelEntry, registry: Registry, data_dir: Path, allow_download: bool) -> Path:
    if entry.source.hub is not None:  # fetched, verified against its pins and linked by app.models.hub
        from app.models.hub import model_path

        return model_path(entry, data_dir, allow_download)
    path = registry.local_folder(entry, data_dir)
    assert path is not None
    if entry.source.single_file is not None:
        if not path.is_file():
            raise ModelUnavailable(f"model {entry.id!r}: no single-file checkpoint at {path}", param="model")
        return path
    if entry.source.build is not None:
        _build_once(entry.source.build, path)
    if not (path / "model_index.json").is_file():
        raise ModelUnavailable(f"model {entry.id!r}: no diffusers folder (model_index.json) at {path}", param="model")
    return path


def _resolve_vae(entry: ModelEntry, registry: Registry, data_dir: Path, allow_download: bool) -> Path | None:
    vae = entry.vae
    if vae is None:
        return None
    if vae.hub is not None:
        from app.models.hub import vae_path

        return vae_path(entry, data_dir, allow_download)
    assert vae.local is not None
    root = registry.resolve(vae.local)
    return root / vae.subfolder if vae.subfolder else root


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


def model_files(entry: ModelEntry, paths: ModelPaths) -> dict[str, Path]:
    """Every file a model loads from, by its key in the manifest's `model.files`; refuses pickled weights.

    A diffusers folder lists its files by relative path; a single-file checkpoint lists itself by
    name and its config folder under ``config/``; a replacement VAE adds ``vae_override/``.
    """
    if paths.config is not None:
        files = {paths.source.name: paths.source}
        files.update({CONFIG_PREFIX + rel: path for rel, path in _folder_files(entry, paths.config).items()})
    else:
        files = _folder_files(entry, paths.source)
    if paths.vae is not None:
        for name in VAE_FILES:
            if not (paths.vae / name).is_file():
                raise ModelUnavailable(
                    f"model {entry.id!r}: the replacement vae folder {paths.vae} has no {name}", param="model"
                )
            files[VAE_PREFIX + name] = paths.vae / name
    return files


def _folder_files(entry: ModelEntry, folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ModelUnavailable(f"model {entry.id!r}: no folder at {folder}", param="model")
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name in _SKIPPED_FILES or path.name.startswith(".") or "/." in f"/{rel}":
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelUnavailable(
                f"model {entry.id!r}: refusing pickled weights file {rel}; only safetensors load",
                param="model",
            )
        files[rel] = path
    return files


def verify_files(entry: ModelEntry, paths: ModelPaths) -> dict[str, str]:
    """Hash every file (once per process per file version); refuse pickled weights and any pin mismatch."""
    files = {rel: file_sha256_once(path) for rel, path in model_files(entry, paths).items()}
    for rel, expected in sorted(entry.sha256.items()):
        actual = files.get(rel)
        if actual is None:
            raise ModelUnavailable(f"model {entry.id!r}: pinned file {rel} is missing from {paths}", param="model")
        if actual != expected:
            raise ModelUnavailable(
                f"model {entry.id!r}: sha256 of {rel} is {actual}, registry pins {expected}; refusing to load",
                param="model",
            )
    if not any(rel.endswith(".safetensors") for rel in files):
        raise ModelUnavailable(f"model {entry.id!r}: no safetensors weights in {paths}", param="model")
    return files


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advisories; Sameseed logs what matters."""
    import threading

    import diffusers
    import tqdm
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Even a disabled bar takes tqdm's write lock, by default a multiprocessing semaphore that only a
    # full interpreter teardown releases; one process renders alone, so a thread lock is all it needs.
    tqdm.tqdm.set_lock(threading.RLock())


def load_model(entry: ModelEntry, paths: ModelPaths, device: str) -> LoadedModel:
    """Verify and load a registered model onto `device` in its registry dtype (a request cannot change it)."""
    import diffusers
    import torch

    # 1. Hash every file the model loads from and check the registry's pins before reading any.
    files = verify_files(entry, paths)
    dtype = getattr(torch, entry.dtype)
    pipeline_cls = getattr(diffusers, entry.pipeline_class)
    kwargs: dict[str, Any] = dict(FAMILIES[entry.family].load_kwargs)
    try:
        # 2. A replacement VAE is loaded first and handed in: the model's own VAE is never read.
        if paths.vae is not None:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(
                paths.vae, dtype=dtype, use_safetensors=True, low_cpu_mem_usage=False, local_files_only=True
            )
        # 3. The pipeline, from a diffusers folder or a single-file checkpoint read with its config folder.
        if paths.config is not None:
            pipe = pipeline_cls.from_single_file(
                str(paths.source), config=str(paths.config), dtype=dtype, local_files_only=True, **kwargs
            )
        else:
            pipe = pipeline_cls.from_pretrained(
                paths.source,
                dtype=dtype,
                use_safetensors=True,
                low_cpu_mem_usage=False,
                local_files_only=True,
                **kwargs,
            )
    except Exception as exc:  # a config/weights mismatch makes the model unavailable, not the worker
        raise ModelUnavailable(f"model {entry.id!r}: cannot load from {paths}: {exc}", param="model") from exc
    # 4. diffusers fills tensors a single file lacks with a random init: refuse such a checkpoint.
    if paths.config is not None:
        _check_checkpoint_complete(entry, pipe, paths.source, replaced_vae=paths.vae is not None)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # 5. Files are checked again after loading so a swap during the load cannot go unrecorded: an unchanged
    #    file by its identity (hashcache), a changed or recently changed one by reading it again.
    if verify_files(entry, paths) != files:
        raise ModelUnavailable(f"model {entry.id!r}: files changed while loading", param="model")
    return LoadedModel(
        entry=entry,
        paths=paths,
        pipe=pipe,
        files=files,
        scheduler_config=json_config(pipe.scheduler.config),
        device=device,
    )


def _check_checkpoint_complete(entry: ModelEntry, pipe: Any, checkpoint: Path, *, replaced_vae: bool) -> None:
    """Raise unless the SD1.x checkpoint holds a tensor for every weight of the UNet, VAE and text encoder."""
    import torch
    from diffusers.loaders import single_file_utils as original
    from safetensors import safe_open

    # Shapes only (meta tensors): the conversion renames keys without reading a byte of weights.
    with safe_open(checkpoint, framework="pt") as handle:
        layout = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    converted = {
        "unet": original.convert_ldm_unet_checkpoint(layout, pipe.unet.config),
        "text_encoder": original.convert_ldm_clip_checkpoint(layout),
    }
    if not replaced_vae:
        converted["vae"] = original.convert_ldm_vae_checkpoint(layout, pipe.vae.config)
    for name, tensors in converted.items():
        found = {key.removeprefix("text_model.") for key in tensors}
        wanted = {key.removeprefix("text_model.") for key in getattr(pipe, name).state_dict()}
        missing = sorted(wanted - found)
        if missing:
            raise ModelUnavailable(
                f"model {entry.id!r}: {checkpoint.name} lacks {len(missing)} {name} tensors "
                f"(e.g. {', '.join(missing[:3])}); refusing random weights",
                param="model",
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
    """A per-request pipeline sharing the model's modules and saved config but owning its scheduler."""
    components = dict(model.pipe.components)
    components["scheduler"] = scheduler
    saved = {k: v for k, v in model.pipe.config.items() if not k.startswith("_") and k not in components}
    view = type(model.pipe)(**components, **{**saved, **FAMILIES[model.entry.family].view_kwargs})
    view.set_progress_bar_config(disable=True)
    return view
