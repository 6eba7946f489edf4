"""Start the real server (real spawned worker processes, the embedded tiny model) for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `python -m app serve` subprocess with its own data dir and log file."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "SAMESEED_DATA_DIR": str(data_dir),
            "SAMESEED_WORKERS": "cpu:1",
            "SAMESEED_CPU_THREADS": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=120.0)

    def start(self, wait_ready: bool = True) -> Server:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> float:
        """Poll /readyz until 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < deadline_s:
            assert self.process is not None and self.process.poll() is None, self.logs()
            try:
                if self.client.get("/readyz", timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready within {deadline_s}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def generate(self, **body):
        response = self.client.post("/v1/generations", json={"prompt": "a photo of a cat", **body})
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.client.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


@pytest.fixture()
def make_server(tmp_path):
    started: list[Server] = []

    def make(name: str = "srv", **env: str) -> Server:
        srv = Server(tmp_path / name, **env)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
