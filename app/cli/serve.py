"""Run the app under uvicorn with a drain on SIGTERM/SIGINT: refuse new work, finish admitted jobs, exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.limits import MAX_HEADER_BYTES
from app.cli.connections import ConnectionLimits, GuardedH11Protocol
from app.settings import Settings

log = logging.getLogger("app.cli.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains the dispatcher before shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        """Serve until drained (remembers the loop so signal handlers can schedule the drain)."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain then exit 0. A second signal: uvicorn's immediate shutdown."""
        dispatcher = getattr(self.app.state, "dispatcher", None)
        if self._drain_task is not None or dispatcher is None or self._loop is None:
            if sig == signal.SIGINT and self._drain_task is not None:
                self.force_exit = True
            self.should_exit = True  # not re-raised: an orderly stop exits with status 0
            return
        log.info("signal %s: draining (grace %.0fs)", signal.Signals(sig).name, self.drain_s)
        dispatcher.begin_drain()  # refuse new work from this instant on
        self._drain_task = asyncio.run_coroutine_threadsafe(self._drain(dispatcher), self._loop)  # type: ignore[assignment]

    async def _drain(self, dispatcher: object) -> None:
        failed = await dispatcher.drain(self.drain_s)  # type: ignore[attr-defined]
        log.info("drained (%d jobs cut at the deadline); shutting down", failed)
        self.should_exit = True


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits the HTTP server puts on each client connection, from the settings."""
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
        max_header_bytes=MAX_HEADER_BYTES,
    )


def server_config(app: FastAPI, *, host: str, port: int, limits: ConnectionLimits) -> uvicorn.Config:
    """uvicorn's configuration: our JSON logs, and connections guarded by `limits`."""
    protocol = type("SameseedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        loop="asyncio",  # not uvloop, which requirements-ray.lock brings in: the same loop with or without Ray
        access_log=False,
        timeout_graceful_shutdown=10,
        http=protocol,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )


def run(app: FastAPI, *, host: str, port: int, drain_s: float, limits: ConnectionLimits | None = None) -> None:
    """Serve `app` until a signal, then drain and exit."""
    config = server_config(app, host=host, port=port, limits=limits or ConnectionLimits())
    DrainingServer(config, app, drain_s).run()
