"""Before a worker's torch and diffusers imports: refuse uncached hub models, start hashing the model files."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from app.models.registry import Registry, load_registry
from app.worker.messages import WorkerConfig

log = logging.getLogger("app.worker")


def files_to_prehash(config: WorkerConfig, registry: Registry | None = None) -> list[Path]:
    """The files of the preloaded models that are on disk already: local folders, single files, built models.

    Hub models are left out (their pull hashes them, with its own locking), as are builtins not built yet:
    nothing here downloads or builds. Any problem is left to the load, which reports it. `registry`: the
    worker's, already read (else read from the config's path).
    """
    from app.pipeline.loader import model_files, resolve_paths

    registry = registry if registry is not None else load_registry(config.registry_path)
    found: list[Path] = []
    for model_id in config.preload:
        entry = registry.get(model_id)
        if entry is None or entry.source.hub is not None or (entry.vae is not None and entry.vae.hub is not None):
            continue
        folder = registry.local_folder(entry, config.data_dir)
        if entry.source.build is not None and not (folder is not None and (folder / "model_index.json").is_file()):
            continue
        paths = resolve_paths(entry, registry, config.data_dir, allow_download=False)
        found.extend(model_files(entry, paths).values())
    return found


def refuse_uncached_hub_models(config: WorkerConfig, registry: Registry) -> None:
    """With downloads off, raise ModelUnavailable for a preloaded hub model missing from the Hugging Face cache.

    The worker then fails its start at once, naming the `models pull` command, instead of after seconds of
    imports. With downloads on, or for any other model, nothing is checked here: the load reports it.
    """
    if config.allow_download:
        return
    from app.models.hub import require_cached

    for model_id in config.preload:
        entry = registry.get(model_id)
        if entry is not None:  # an unknown id is the load's to report
            require_cached(entry)  # no hub download in the entry: nothing to look up


def start_prehash(config: WorkerConfig, registry: Registry | None = None) -> threading.Thread | None:
    """Hash the preloaded models' files on a background thread into the process's cache; None when none."""
    from app.pipeline.hashcache import prehash

    try:
        files = files_to_prehash(config, registry)
    except Exception as exc:  # the load itself will fail with the reason; this is only a head start
        log.debug("no prehash: %s", exc)
        return None
    return prehash(files) if files else None
