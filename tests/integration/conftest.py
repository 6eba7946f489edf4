"""Start the real server (real spawned worker processes, the embedded tiny model) for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.launcher import ROOT, ServerProcess

__all__ = ["ROOT", "Server"]


class Server(ServerProcess):
    """A test server: `generate` asserts a 200 and returns the JSON body."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        super().__init__(data_dir, **env)

    def generate(self, **body):
        response = self.post(**body)
        assert response.status_code == 200, response.text
        return response.json()


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
