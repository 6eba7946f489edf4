"""HTTP/1.1 connections under uvicorn: deadlines for slow clients, a connection cap, JSON error bodies.

uvicorn times out only idle keep-alive connections: a client trickling its headers or body holds
its connection (and a file descriptor) forever, and a request it cannot parse gets a plain-text
400. This protocol adds a deadline for the header section and one for the body, refuses
connections past a cap, and answers each of these with the one JSON error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import MalformedRequest, RequestTimeout, SameseedError, TooManyConnections

log = logging.getLogger("app.cli.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request, how large its head may be, how many may connect."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    max_header_bytes: int = 16 << 10


def error_response(error: SameseedError) -> bytes:
    """A complete HTTP/1.1 response with the error's JSON body, closing the connection."""
    body = json.dumps(error.body()).encode("utf-8")
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.lower()}: {value}" for name, value in error.headers().items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines, a connection cap and JSON errors."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body" while a deadline runs
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse past the connection cap; else start the header deadline."""
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            log.warning("refused a connection: %d open, the limit", len(self.connections))
            transport.write(
                error_response(
                    TooManyConnections(
                        f"the server has {self.limits.max_connections} connections open, its limit; retry shortly"
                    )
                )
            )
            # Half-close rather than close: a client still sending its request would get a reset and
            # lose the answer; the connection closes once its request is in, or after a second.
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(min(1.0, self.limits.header_timeout_s), transport.close)
            self.transport = transport
            return
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline; a refused connection never joined the server's state."""
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed h11, then follow the request's phase with the matching deadline."""
        if self._refused:
            self.transport.close()  # its answer went out already
            return
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        """A response went out: the next request's headers are on the clock again."""
        super().on_response_complete()
        self._follow()

    def send_400_response(self, msg: str) -> None:
        """The one JSON error body for a request h11 cannot parse (malformed, or a head past the limit)."""
        if self.transport.is_closing():
            return
        buffered, _ = self.conn.trailing_data
        limit = self.limits.max_header_bytes
        message = (
            f"the request's header section is larger than {limit >> 10} KiB, this server's limit"
            if len(buffered) > limit
            else "the request is not valid HTTP/1.1"
        )
        self._disarm()
        self.transport.write(error_response(MalformedRequest(message)))
        self.transport.close()

    def _follow(self) -> None:
        if self._refused or self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._reading != "headers":
                self._arm("headers")
        elif state is h11.SEND_BODY:
            if self._reading != "body":
                self._arm("body")
        else:  # the request is in: the application's time is not the client's
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
        self._reading = phase
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._reading = None, None

    def _timed_out(self) -> None:
        phase, self._deadline = self._reading, None
        if self.transport.is_closing():
            return
        seconds = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
        started = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        idle = phase == "headers" and not self.conn.trailing_data[0]
        if not started and not idle:  # an idle keep-alive connection just closes, as uvicorn's own timeout does
            self.transport.write(
                error_response(RequestTimeout(f"the request's {phase} did not arrive within {seconds:g} s"))
            )
        self.transport.close()
