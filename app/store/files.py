"""The image store: each generation's PNGs and manifest as files, written atomically and durably.

Layout: `<root>/<id[4:6]>/<id>/manifest.json` and `<k>.png`. Every file goes through a temporary
file, fsync and rename, then its directory is fsynced, so a file either exists complete or not at
all, even after SIGKILL or a power cut.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

_ID_PATTERN = re.compile(r"^gen_[0-9a-f]{8,64}$")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(files: dict[Path, bytes]) -> None:
    """Write files of one directory: each to a temp file and fsync, rename them all, then fsync the directory."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            staged.append((tmp, path))
            with tmp.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for parent in {path.parent for path in files}:
        fsync_dir(parent)


class ImageStore:
    """Files of generations under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, generation_id: str) -> Path:
        """The directory of one generation (ids are checked: no path tricks)."""
        if not _ID_PATTERN.match(generation_id):
            raise ValueError(f"not a generation id: {generation_id!r}")
        return self.root / generation_id[4:6] / generation_id

    def relative(self, path: Path) -> str:
        """A stored path relative to the root (what the ledger records)."""
        return path.relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        """The absolute path of a path the ledger recorded."""
        return self.root / relative

    def _make_dirs(self, folder: Path) -> None:
        # A new directory entry is durable only once its parent is fsynced too.
        created = [p for p in (folder.parent, folder) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for path in created:
            fsync_dir(path.parent)

    def write_generation(
        self, generation_id: str, manifest_json: bytes, pngs: list[bytes], latents: list[bytes] | None = None
    ) -> list[Path]:
        """Write the manifest, every PNG and (when given) every `<k>.latents.npy` durably; returns the PNG paths."""
        folder = self.folder(generation_id)
        self._make_dirs(folder)
        paths = [folder / f"{index}.png" for index in range(len(pngs))]
        files = {**dict(zip(paths, pngs, strict=True)), folder / "manifest.json": manifest_json}
        for index, npy in enumerate(latents or []):
            if npy:
                files[self.latents_path(generation_id, index)] = npy
        write_atomic(files)
        return paths

    def latents_path(self, generation_id: str, index: int) -> Path:
        """Where the final latents of one image are kept (numpy .npy, float32)."""
        return self.folder(generation_id) / f"{index}.latents.npy"

    def delete_images(self, generation_id: str) -> int:
        """Delete a generation's PNGs (the manifest file stays); returns the bytes freed."""
        folder = self.folder(generation_id)
        freed = 0
        for path in [*folder.glob("*.png"), *folder.glob("*.latents.npy")]:
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
        return freed

    def delete_generation(self, generation_id: str) -> None:
        """Remove a generation's folder entirely (files written for a generation the ledger never took)."""
        shutil.rmtree(self.folder(generation_id), ignore_errors=True)
