"""sha256 of model files, read once per process per version of a file: a stat-keyed cache a changed file misses.

A worker start used to read every byte of a model three times just to hash it: the hub pull's
check, the pin check before loading, the re-check after loading. With this cache each file is
hashed once per start; the checks after the first compare the file's identity instead.

The key is (device, inode, size, mtime, ctime). Writing a file changes its mtime and ctime (and
ctime cannot be set back by a user); replacing it changes the inode. A timestamp only has the
kernel's tick for resolution, though, so a file changed shortly before it was hashed could be
changed again within the same tick without its key changing. Such a file ("racy", as git calls
it) is never cached: it is hashed again at every check. So a cached digest is only ever returned
for bytes that are unchanged since they were hashed, and the loader's guarantee stays whole: no
byte is loaded that was not verified.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.provenance.hashes import file_sha256

# A file whose last change is less than this before its hashing began is never cached.
RACY_S = 2.0

Identity = tuple[int, int, int, int, int]


def identity(stat: os.stat_result) -> Identity:
    """What changes whenever a file's bytes do: device, inode, size, mtime and ctime (ns)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class HashCache:
    """sha256 by file identity; thread-safe, and a file being hashed by one thread is not read again by
    another (it waits for that digest); `clock` is wall time (file timestamps are wall time)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._digests: dict[Identity, str] = {}
        self._inflight: dict[Identity, threading.Event] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes read to hash, for measurements and tests

    def sha256(self, path: Path) -> str:
        """The sha256 of the file's bytes now: from the cache when the file is unchanged since hashed, else read."""
        key = identity(os.stat(path))  # follows links: a hub view links to its blobs
        with self._lock:
            cached = self._digests.get(key)
            if cached is not None:
                return cached
            running = self._inflight.get(key)
            if running is None:
                running = self._inflight[key] = threading.Event()
                owner = True
            else:
                owner = False
        if not owner:
            running.wait()
            with self._lock:
                cached = self._digests.get(key)
            # None: the other thread's digest was not cacheable (racy, or the file changed): read it here.
            return cached if cached is not None else self._hash(path, key)
        try:
            return self._hash(path, key)
        finally:
            with self._lock:
                del self._inflight[key]
            running.set()

    def _hash(self, path: Path, key: Identity) -> str:
        started = self._clock()
        digest = file_sha256(Path(path))
        after = os.stat(path)
        last_change_s = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
        with self._lock:
            self.hashed_bytes += after.st_size
            # Cached only when the file did not change while it was read and is not racy.
            if identity(after) == key and last_change_s < started - RACY_S:
                self._digests[key] = digest
        return digest

    def clear(self) -> None:
        """Forget every digest."""
        with self._lock:
            self._digests.clear()


CACHE = HashCache()


def file_sha256_once(path: Path) -> str:
    """sha256 of a model file through this process's cache (see the module docstring for why it is safe)."""
    return CACHE.sha256(path)


def prehash(paths: list[Path]) -> threading.Thread:
    """Hash `paths` into this process's cache on a background thread (hashlib releases the GIL), so a worker's
    imports and its file hashing overlap; the pin check before loading then finds the digests, or waits for them.
    Unreadable files are left to that check, which reports them."""

    def run() -> None:
        for path in paths:
            try:
                file_sha256_once(path)
            except OSError:
                continue

    thread = threading.Thread(target=run, name="sameseed-prehash", daemon=True)
    thread.start()
    return thread
