"""HTTP request timing: a pure ASGI middleware observing each request's duration by route template and status."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"  # any path no route serves: one series, whatever clients probe


def route_template(scope: Scope) -> str:
    """The path template of the route that served this scope (e.g. `/v1/generations/{generation_id}`)."""
    route: Any = scope.get("route")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED


class RequestTiming:
    """Observe every HTTP request in `histogram` labelled by route template, method and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request from its start to its last body byte (or the exception that ended it)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), 500  # an exception before any response is answered 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.histogram.labels(route=route_template(scope), method=scope["method"], status=str(status)).observe(
                time.perf_counter() - began
            )
