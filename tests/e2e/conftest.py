"""End-to-end fixtures: servers a test starts itself (`make_server`); the session's `server` is in tests/conftest.py."""

from __future__ import annotations

import pytest

from tests.support.servers import ROOT, Server

__all__ = ["ROOT", "Server"]


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
