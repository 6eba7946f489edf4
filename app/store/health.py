"""Storage health: whether the data dir can be written now (disk full, read-only, permissions), for /readyz.

With a database ledger (PostgreSQL) the probe also asks the database to answer, so a server whose
database is gone stops reading ready instead of failing every request.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

PROBE_BYTES = 4096
PROBE_EVERY_S = 1.0  # /readyz may be polled hard; a probe is a small write and an fsync


class StorageHealth:
    """Probes the data dir and image store with a small durable write; remembers the last failure of any write."""

    def __init__(
        self,
        directories: list[Path],
        *,
        probe_every_s: float = PROBE_EVERY_S,
        ping: Callable[[], None] | None = None,
    ) -> None:
        self.directories = directories
        self.ping = ping  # raises when the ledger's database cannot answer
        self.probe_every_s = probe_every_s
        self.problem: str | None = None
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()
        # Unique per server, not just per pid: servers on several nodes may share one data dir (NFS).
        self._probe_name = f".probe-{os.getpid()}-{secrets.token_hex(4)}"

    def failed(self, reason: str) -> None:
        """Record that a real write failed: storage reads unhealthy until the next probe succeeds."""
        self.problem = reason
        self._checked_at = float("-inf")  # let the next /readyz probe at once, so recovery is seen quickly

    def probe(self) -> str | None:
        """Write, fsync and remove a small file in each directory, then ping the ledger (blocking); the first error."""
        for directory in self.directories:
            path = directory / self._probe_name
            try:
                with path.open("wb") as handle:
                    handle.write(b"\0" * PROBE_BYTES)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                return f"{directory.name or directory}: {exc.strerror or exc}"
            finally:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        if self.ping is not None:
            try:
                self.ping()
            except RuntimeError as exc:  # LedgerError: the message names the database, never its password
                return f"ledger: {exc}"
        return None

    async def check(self) -> str | None:
        """Why storage cannot be written now (None: it can), probing at most every `probe_every_s`."""
        async with self._lock:
            if time.monotonic() - self._checked_at >= self.probe_every_s:
                self.problem = await asyncio.to_thread(self.probe)
                self._checked_at = time.monotonic()
            return self.problem
