"""Request body limits: an oversized body is refused with 413 before it is read into memory."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.openai_images import OPENAI_PATH_PREFIX, openai_error_response
from app.errors import PayloadTooLarge

MAX_BODY_BYTES = 64 << 20  # any route; POST /v1/verify and /v1/reproduce accept up to this
MAX_HEADER_BYTES = 16 << 10  # a request's line and headers together (a longer one is 400 before any route)
ROUTE_BODY_LIMITS: Mapping[str, int] = {  # a generation request is a few KB
    path: 1 << 20 for path in ("/v1/generations", "/v1/images/generations", "/sdapi/v1/txt2img")
}


def describe(limit: int) -> str:
    """A byte limit in words, e.g. `1 MiB`."""
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and not limit % (1 << 20) else f"{limit} bytes"


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 `payload_too_large` when a body's declared or streamed size passes its limit."""

    def __init__(
        self, app: ASGIApp, default: int = MAX_BODY_BYTES, routes: Mapping[str, int] = ROUTE_BODY_LIMITS
    ) -> None:
        self.app = app
        self.default = default
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a too-large Content-Length at once; stop a chunked body once it grows past the limit."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get(scope["path"], self.default)
        message = f"the body exceeds {describe(limit)}, this route's limit"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            error = PayloadTooLarge(message)
            if scope["path"].startswith(OPENAI_PATH_PREFIX):  # the OpenAI SDK's routes answer in OpenAI's shape
                await openai_error_response(error)(scope, receive, send)
                return
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > limit:  # an HTTPException, so FastAPI's body parsing passes it on unchanged
                    raise HTTPException(status_code=413, detail=message)
            return event

        await self.app(scope, limited, send)
