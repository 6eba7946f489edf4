"""Models from the Hugging Face Hub: pinned commits into the HF cache, verified, then pinned by sha256.

Each hub download a registered model needs is fetched at the registry's commit and limited to the
files a pipeline reads (safetensors weights, configs, tokenizer files; pickles are never fetched).
The first pull checks every file against the hashes the hub lists for that commit and records
their sha256 in ``<data dir>/hub-pins.json``; every later load must match those pins. The loader
reads the model from ``<data dir>/hub/<model id>/<role>``, a folder of links to exactly the fetched
files, so whatever else the shared HF cache holds never enters a model's identity.

The one module that downloads from the hub; it never imports torch or diffusers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelUnavailable
from app.models.registry import ModelEntry
from app.pipeline.hashcache import file_sha256_once

log = logging.getLogger(__name__)

PINS_FILE = "hub-pins.json"
PINS_FORMAT = "sameseed.hub-pins/1"
VIEWS_DIR = "hub"
# Never downloaded, whatever a pattern says: loading a pickle can run code.
PICKLE_PATTERNS = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.pickle")
# The files AutoencoderKL.from_pretrained reads from a replacement VAE folder (as the loader's VAE_FILES).
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_SHARD = "[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_HEX64, _HEX40 = re.compile(r"^[0-9a-f]{64}$"), re.compile(r"^[0-9a-f]{40}$")


def _diffusers_patterns() -> tuple[str, ...]:
    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    for component, stem in {**_WEIGHTS, "text_encoder_2": "model"}.items():
        patterns += [
            f"{component}/config.json",
            f"{component}/{stem}.safetensors",
            f"{component}/{stem}.safetensors.index.json",
            f"{component}/{stem}-{_SHARD}.safetensors",
        ]
    for tokenizer in ("tokenizer", "tokenizer_2"):
        patterns += [f"{tokenizer}/{name}" for name in _TOKENIZER_FILES]
    return tuple(patterns)


# A diffusers-format SD1.x/SDXL repo: the components the pipeline loads, full-precision files only
# (no fp16/non-EMA variants, no safety checker, no root-level single-file checkpoints).
DIFFUSERS_PATTERNS = _diffusers_patterns()


@dataclass(frozen=True)
class HubFetch:
    """One pinned hub download a model needs; `role` names the folder its files appear in."""

    role: str  # "model" or "vae"
    repo: str
    revision: str
    patterns: tuple[str, ...]

    @property
    def label(self) -> str:
        """repo@revision, as messages and the pins file name it."""
        return f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class Snapshot:
    """A verified hub download: a folder of links to exactly its files, and their sha256 by relative path."""

    folder: Path
    files: dict[str, str]
    downloaded: bool  # some file came from the hub this time (else all were in the cache)


def plan(entry: ModelEntry) -> list[HubFetch]:
    """The hub downloads a registered model needs: its own files, then a replacement VAE's (none if local)."""
    fetches: list[HubFetch] = []
    hub = entry.source.hub
    if hub is not None:
        patterns = (hub.filename,) if hub.filename else DIFFUSERS_PATTERNS
        fetches.append(HubFetch("model", hub.repo, hub.revision, patterns))
    vae = entry.vae
    if vae is not None and vae.hub is not None:
        prefix = f"{vae.subfolder}/" if vae.subfolder else ""
        fetches.append(HubFetch("vae", vae.hub.repo, vae.hub.revision, tuple(prefix + name for name in VAE_FILES)))
    return fetches


def pull(
    entry: ModelEntry,
    *,
    data_dir: Path,
    allow_download: bool,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> dict[str, Snapshot]:
    """Make every hub download of a model available offline and verified; by role. Raises ModelUnavailable."""
    return {
        item.role: fetch(
            item,
            model_id=entry.id,
            data_dir=data_dir,
            allow_download=allow_download,
            cache_dir=cache_dir,
            endpoint=endpoint,
            progress=progress,
        )
        for item in plan(entry)
    }


def model_path(entry: ModelEntry, data_dir: Path, allow_download: bool) -> Path:
    """Where the loader reads a hub model: its diffusers folder, or its single-file checkpoint."""
    hub = entry.source.hub
    assert hub is not None, "model_path is for hub models"
    item = next(item for item in plan(entry) if item.role == "model")
    folder = fetch(item, model_id=entry.id, data_dir=data_dir, allow_download=allow_download).folder
    return folder / hub.filename if hub.filename else folder


def vae_path(entry: ModelEntry, data_dir: Path, allow_download: bool) -> Path:
    """Where the loader reads a model's replacement VAE from the hub (its subfolder included)."""
    vae = entry.vae
    assert vae is not None and vae.hub is not None, "vae_path is for a replacement VAE from the hub"
    item = next(item for item in plan(entry) if item.role == "vae")
    folder = fetch(item, model_id=entry.id, data_dir=data_dir, allow_download=allow_download).folder
    return folder / vae.subfolder if vae.subfolder else folder


def require_cached(entry: ModelEntry) -> None:
    """Raise ModelUnavailable (the message `fetch` gives) unless every hub download of `entry` is in the cache.

    A cache lookup only: nothing is downloaded, hashed, pinned or linked (`fetch` does that at the load).
    """
    for item in plan(entry):
        _snapshot(item, entry.id, allow_download=False, cache_dir=None, endpoint=None, progress=False)


def fetch(
    item: HubFetch,
    *,
    model_id: str,
    data_dir: Path,
    allow_download: bool,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> Snapshot:
    """Fetch one download (cache first; the hub only when allowed), verify it, pin it, and link its files."""
    started = time.perf_counter()
    # 1. The snapshot folder in the HF cache, downloaded if missing and allowed.
    snapshot, downloaded = _snapshot(item, model_id, allow_download, cache_dir, endpoint, progress)
    # 2. The files this download selects, checked complete against the hub's listing of the commit.
    listing = _hub_listing(item, cache_dir)
    selected = _selected(item, model_id, snapshot, listing)
    # 3. Hash (outside the lock: several workers may start at once), check against pins or the hub, pin.
    hashes = {rel: file_sha256_once(snapshot / rel) for rel in selected}
    with _locked(data_dir):
        _check_and_pin(item, model_id, snapshot, hashes, listing, data_dir)
        folder = _link_view(data_dir / VIEWS_DIR / model_id / item.role, {rel: snapshot / rel for rel in hashes})
    size = sum((snapshot / rel).stat().st_size for rel in hashes)
    log.info(
        "hub %s of model %s: %s %d files (%.2f GB) in %.1fs",
        item.label,
        model_id,
        "downloaded and verified" if downloaded else "verified",
        len(hashes),
        size / 1e9,
        time.perf_counter() - started,
    )
    return Snapshot(folder=folder, files=hashes, downloaded=downloaded)


def read_pins(data_dir: Path) -> dict[str, dict[str, str]]:
    """The sha256 pinned at first verified pulls: {"repo@revision": {relative path: sha256}}."""
    path = data_dir / PINS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read the hub pins {path}: {exc}", param="model") from exc
    if not isinstance(raw, dict) or raw.get("format") != PINS_FORMAT or not isinstance(raw.get("repos"), dict):
        raise ModelUnavailable(f"{path} is not a {PINS_FORMAT} file; refusing to guess its pins", param="model")
    return raw["repos"]


def _write_pins(data_dir: Path, repos: dict[str, dict[str, str]]) -> None:
    path = data_dir / PINS_FILE
    body = {"format": PINS_FORMAT, "repos": {k: dict(sorted(v.items())) for k, v in sorted(repos.items())}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".hub.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # worker processes and `models pull` may run at once
        yield


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):  # a worker logs one line per download instead of redrawing bars in the logs
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _snapshot(
    item: HubFetch,
    model_id: str,
    allow_download: bool,
    cache_dir: Path | None,
    endpoint: str | None,
    progress: bool,
) -> tuple[Path, bool]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs: dict[str, Any] = {
        "repo_id": item.repo,
        "revision": item.revision,
        "allow_patterns": list(item.patterns),
        "ignore_patterns": list(PICKLE_PATTERNS),
        "cache_dir": cache_dir,
        "endpoint": endpoint,
        "tqdm_class": None if progress else _silent_tqdm(),
    }
    try:  # a warm cache never touches the network, even when downloads are allowed
        return Path(snapshot_download(local_files_only=True, **kwargs)), False
    except LocalEntryNotFoundError:  # absent, or incomplete as the cached listing of the commit shows
        if not allow_download:
            raise ModelUnavailable(
                f"model {model_id!r}: {item.label} is not (completely) in the Hugging Face cache and "
                f"SAMESEED_ALLOW_DOWNLOAD is off; run `python -m app models pull {model_id}` or turn it on",
                param="model",
            ) from None
    log.info("downloading %s for model %s", item.label, model_id)
    try:
        return Path(snapshot_download(**kwargs)), True
    except Exception as exc:  # network, auth, a missing revision: all make the model unavailable
        raise ModelUnavailable(
            f"model {model_id!r}: cannot download {item.label}: {type(exc).__name__}: {exc}", param="model"
        ) from exc


def _hub_listing(item: HubFetch, cache_dir: Path | None) -> dict[str, tuple[int, str]] | None:
    """(size, git object id) of every file of the commit, from the listing huggingface_hub cached; None if none."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = get_cached_repo_tree(item.repo, revision=item.revision, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return None
    return {f.path: (f.size, f.blob_id) for f in tree}


def _matching(item: HubFetch, paths: Iterable[str]) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(paths, allow_patterns=list(item.patterns), ignore_patterns=list(PICKLE_PATTERNS)))


def _selected(item: HubFetch, model_id: str, snapshot: Path, listing: dict[str, tuple[int, str]] | None) -> list[str]:
    present = (p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    selected = sorted(_matching(item, present))
    if listing is not None:
        missing = sorted(_matching(item, listing) - set(selected))
        if missing:
            raise ModelUnavailable(
                f"model {model_id!r}: the cached {item.label} lacks {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                param="model",
            )
    if not selected:
        raise ModelUnavailable(
            f"model {model_id!r}: no file of {item.label} matches {list(item.patterns)}", param="model"
        )
    return selected


def _check_and_pin(
    item: HubFetch,
    model_id: str,
    snapshot: Path,
    hashes: dict[str, str],
    listing: dict[str, tuple[int, str]] | None,
    data_dir: Path,
) -> None:
    repos = read_pins(data_dir)
    pinned = repos.get(item.label, {})
    new: dict[str, str] = {}
    for rel, digest in sorted(hashes.items()):
        if rel in pinned:
            if pinned[rel] != digest:
                raise ModelUnavailable(
                    f"model {model_id!r}: {item.repo}/{rel} has sha256 {digest}, but its first verified pull "
                    f"pinned {pinned[rel]} ({data_dir / PINS_FILE}); the cached file changed: remove "
                    f"{snapshot} and pull again",
                    param="model",
                )
            continue
        problem = _against_hub(snapshot / rel, digest, (listing or {}).get(rel))
        if problem:
            raise ModelUnavailable(f"model {model_id!r}: {item.repo}/{rel}: {problem}; refusing it", param="model")
        new[rel] = digest
    if new:
        repos[item.label] = {**pinned, **new}
        _write_pins(data_dir, repos)
        log.info("pinned the sha256 of %d files of %s in %s", len(new), item.label, data_dir / PINS_FILE)


def _against_hub(path: Path, sha256: str, listed: tuple[int, str] | None) -> str | None:
    """None if the file is what the hub declared when it was downloaded, else what is wrong with it."""
    if listed is not None and path.stat().st_size != listed[0]:
        return f"its size is {path.stat().st_size} bytes, the hub lists {listed[0]}"
    declared = _cache_etag(path)
    if declared is None and listed is not None:
        declared = ("git-sha1", listed[1])  # the object id of a plain git file (an LFS file's is its pointer's)
    if declared is None:
        return "the hub's hash of it is unknown (not a link to a cache blob, and no cached listing)"
    kind, expected = declared
    actual = sha256 if kind == "sha256" else git_blob_sha1(path)
    return None if actual == expected else f"its {kind} is {actual}, the hub declared {expected}"


def _cache_etag(path: Path) -> tuple[str, str] | None:
    # A snapshot file links to blobs/<ETag>: the hub's sha256 of an LFS file, the git blob id of any other.
    if not path.is_symlink():
        return None
    name = Path(os.readlink(path)).name
    return ("sha256", name) if _HEX64.match(name) else ("git-sha1", name) if _HEX40.match(name) else None


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's bytes (sha1 of "blob <size>\\0" + bytes), as the hub lists non-LFS files."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _link_view(view: Path, targets: dict[str, Path]) -> Path:
    """Make `view` a folder of links to exactly `targets` (relative path -> file); keep it if it already is."""
    wanted = {rel: str(target) for rel, target in targets.items()}
    current = _view_links(view)
    if current == wanted:
        return view
    if view.exists() and current is None:
        raise ModelUnavailable(
            f"{view} holds files Sameseed did not link there; move it away so the hub model can be linked",
            param="model",
        )
    tmp = view.with_name(f".{view.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, target in sorted(wanted.items()):
        link = tmp / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    if view.exists():
        old = view.with_name(f".{view.name}.{os.getpid()}.old")
        view.rename(old)
        shutil.rmtree(old)  # removes the links, never what they point to
    tmp.rename(view)
    return view


def _view_links(view: Path) -> dict[str, str] | None:
    """The links of a view folder by relative path; None if it is absent or holds anything but links."""
    if not view.is_dir():
        return None
    links: dict[str, str] = {}
    for path in view.rglob("*"):
        if path.is_symlink():
            links[path.relative_to(view).as_posix()] = os.readlink(path)
        elif not path.is_dir():
            return None
    return links
