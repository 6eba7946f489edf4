"""POST /v1/reproduce: replay a manifest, a PNG or a ledger generation and answer with a verdict."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.api.deps import GenerationDep
from app.api.provenance import read_body
from app.api.responses import ERROR_RESPONSES
from app.api.schemas import GenerationRequest, ReplayResponse
from app.errors import InvalidRequest
from app.provenance.manifest import Manifest
from app.services.replay import first_error, load_source, parse_manifest, reproduce

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


def request_of(manifest: Manifest) -> GenerationRequest:
    """The manifest's generation parameters as a request, checked like any client's (422 naming the field)."""
    try:
        return GenerationRequest.model_validate(manifest.request.as_dict())
    except ValidationError as exc:
        where, message = first_error(exc)
        raise InvalidRequest(
            f"the manifest's request cannot be replayed here: {where}: {message}",
            param=f"manifest.request.{where}",
        ) from None


@router.post("/reproduce", openapi_extra=_BODY, response_model=ReplayResponse, responses=ERROR_RESPONSES)
async def replay(request: Request, generations: GenerationDep) -> ReplayResponse:
    """Regenerate the images and say `identical` (latents and pixels, bitwise) or how they differ and why."""
    body = await read_body(request)
    if not body:
        raise InvalidRequest('send a manifest, {"generation_id": ...} or a PNG as the body', param="body")
    source = await asyncio.to_thread(load_source, body, generations.archive)
    original = parse_manifest(source)
    fields = request_of(original).param_fields()
    try:  # every field checked before any work, against the model's limits too
        params = generations.resolve(**fields)
    except InvalidRequest as exc:
        raise InvalidRequest(
            f"the manifest's request cannot be replayed here: {exc.message}",
            param=f"manifest.request.{exc.param}" if exc.param else "manifest.request",
        ) from None
    report = await reproduce(generations, source, original, params, disconnected=request.is_disconnected)
    return ReplayResponse.model_validate(report)
