"""JSON request bodies: refused before parsing unless sent as UTF-8 JSON with a JSON content type."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.errors import MalformedRequest, UnsupportedMediaType

_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def check_content_type(value: str | None) -> None:
    """415 unless `value` is application/json (or application/*+json) in UTF-8."""
    hint = "send the body as JSON with `Content-Type: application/json`"
    if not value:
        raise UnsupportedMediaType(f"the request has a body but no Content-Type: {hint}", param="content-type")
    message = Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise UnsupportedMediaType(f"the body was sent as {message.get_content_type()}: {hint}", param="content-type")
    charset = message.get_param("charset")
    if isinstance(charset, str) and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"JSON is UTF-8 (RFC 8259); got charset={charset}", param="content-type")


def check_encoding(body: bytes) -> None:
    """400 unless the body is UTF-8 without a byte order mark, as RFC 8259 requires of JSON."""
    # json.loads would accept UTF-16/32 and a BOM; the README promises 400 for them
    if body.startswith(_BOMS) or b"\0" in body[:4]:
        raise MalformedRequest("the body must be JSON in UTF-8 without a byte order mark (not UTF-16/32)")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None


class JsonBodyRoute(APIRoute):
    """A route whose JSON body is checked for content type and encoding before FastAPI parses it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, preceded by the checks when the route takes a body and one was sent."""
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            body = await request.body()  # cached on the request: FastAPI reads it from there
            if body:
                check_content_type(request.headers.get("content-type"))
                check_encoding(body)
            return await handler(request)

        return checked
