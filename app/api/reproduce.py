"""POST /v1/reproduce: replay a manifest, a PNG or a ledger generation and answer with a verdict."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from app.api.deps import DispatcherDep
from app.api.provenance import read_body
from app.api.responses import ERROR_RESPONSES
from app.errors import InvalidRequest
from app.services.replay import load_source, reproduce

router = APIRouter(prefix="/v1", tags=["consistency"])

_BODY = {
    "requestBody": {
        "required": True,
        "description": 'A manifest (JSON), {"generation_id": "gen_..."}, or a PNG with an embedded manifest.',
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/reproduce", openapi_extra=_BODY, responses=ERROR_RESPONSES)
async def replay(request: Request, dispatcher: DispatcherDep) -> dict:
    """Regenerate the images and say `identical` (latents and pixels, bitwise) or how they differ and why."""
    body = await read_body(request)
    if not body:
        raise InvalidRequest('send a manifest, {"generation_id": ...} or a PNG as the body', param="body")
    source = await asyncio.to_thread(load_source, body, getattr(request.app.state, "archive", None))
    return await reproduce(dispatcher, source, disconnected=request.is_disconnected)
