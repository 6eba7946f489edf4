"""A throwaway PostgreSQL cluster (initdb + pg_ctl in a temporary folder, a free loopback port): bench and tests.

It runs Debian's server binaries (package `postgresql`: /usr/lib/postgresql/<version>/bin).
initdb refuses to run as root, so as root the cluster runs as the `postgres` user (or `nobody`)
and its folder is handed to that user; as anyone else it runs as that user. Connections are
over TCP on 127.0.0.1 with `trust` authentication: the cluster lives only as long as its owner.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

SUPERUSER = "sameseed"


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or the cluster did not start (the message says which)."""


def server_bindir() -> Path:
    """The newest installed PostgreSQL server's bin folder; ClusterUnavailable when there is none."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterUnavailable(
        "no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin: "
        "install Debian's `postgresql` package (make postgresql)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class _RunAs:
    user: str | None  # None: the current user
    uid: int
    gid: int


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, os.geteuid(), os.getegid())
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise ClusterUnavailable("running as root, and neither a `postgres` nor a `nobody` user exists to run initdb")


class ThrowawayCluster:
    """A PostgreSQL cluster in a temporary folder; `start()` then `url(dbname)`; `stop()` removes everything."""

    def __init__(self, *, fsync: bool = True) -> None:
        self.fsync = fsync
        self.bindir = server_bindir()
        self.port = 0
        self.folder: Path | None = None
        self._as = _run_as()

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        user = {} if self._as.user is None else {"user": self._as.uid, "group": self._as.gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True, text=True, timeout=timeout, check=False, cwd=self.folder,
            env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}, **user,  # type: ignore[arg-type]
        )

    def start(self) -> ThrowawayCluster:
        """initdb and start the server on a free port; ClusterUnavailable with its log when it fails."""
        # mkdtemp in the system temp dir, not under a 0700 parent: the server's user must reach it
        self.folder = Path(tempfile.mkdtemp(prefix="sameseed-pg-"))
        os.chown(self.folder, self._as.uid, self._as.gid)
        data, log = self.folder / "data", self.folder / "server.log"
        done = self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            self.stop()
            raise ClusterUnavailable(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        options = f"-h 127.0.0.1 -k {self.folder} -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        for _ in range(3):  # another process may take the free port first
            self.port = free_port()
            done = self._run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60",
                             "-o", f"{options} -p {self.port}", "start")
            if done.returncode == 0:
                return self
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else done.stderr
        self.stop()
        raise ClusterUnavailable(f"pg_ctl start failed: {tail.strip()}")

    def url(self, dbname: str = "postgres", *, search_path: str | None = None) -> str:
        """A connection URL for a database of this cluster (optionally with a schema as its search path)."""
        options = f"?options={quote(f'-csearch_path={search_path}')}" if search_path else ""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}{options}"

    def stop(self) -> None:
        """Stop the server at once and remove its folder."""
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60.0)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> ThrowawayCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
