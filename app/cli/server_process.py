"""Start `python -m app serve` as a child process and wait for it to be ready (bench and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/PID/stat text after "pid (comm) " (comm may hold spaces and parentheses)."""
    return stat[stat.rindex(")") + 2:].split()


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the /proc/PID/stat fields after "pid (comm) ": state, ppid, pgrp, session, ...) of every live
    process (Linux); a process that ends while being read is left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat_fields(stat)


class ServerProcess:
    """A Sameseed server in a child process with its own data dir, port and log file."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "server.log"
        self.env = {
            **os.environ,
            "SAMESEED_DATA_DIR": str(data_dir),
            "SAMESEED_WORKERS": "cpu:1",
            "SAMESEED_CPU_THREADS": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=600.0)
        self.started_at = 0.0

    def start(self, wait_ready: bool = True, deadline_s: float = 180.0) -> ServerProcess:
        """Spawn the server; by default block until /readyz answers 200."""
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_ready:
            self.wait_ready(deadline_s)
        return self

    def wait_ready(self, deadline_s: float = 180.0) -> float:
        """Poll /readyz until 200; returns seconds since the process was started."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"server exited before it was ready:\n{self.logs()}")
            try:
                if self.client.get("/readyz", timeout=2.0).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready within {deadline_s}s:\n{self.logs()}")

    def logs(self, tail: int = 5000) -> str:
        """The end of the server's log."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def post(self, **body: Any) -> httpx.Response:
        """POST /v1/generations with a default prompt."""
        return self.client.post("/v1/generations", json={"prompt": "a photo of a cat", **body})

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (drain), then kill if it lingers; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.client.close()
        return self.process.returncode
