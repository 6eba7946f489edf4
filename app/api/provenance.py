"""POST /v1/verify (a PNG or a manifest JSON) and GET /v1/keys (the public keys that sign manifests)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from app.api.deps import ArchiveDep
from app.api.limits import MAX_BODY_BYTES, describe
from app.api.responses import error_responses
from app.api.schemas import KeyList, PublicKeyInfo, VerifyResponse
from app.errors import InvalidRequest, MalformedRequest, PayloadTooLarge, StorageUnavailable
from app.provenance.manifest import parse_json
from app.provenance.png import PNG_SIGNATURE
from app.provenance.verification import UnverifiableInput, Verification

router = APIRouter(prefix="/v1", tags=["provenance"])

MAX_VERIFY_BYTES = MAX_BODY_BYTES  # one source: the body limit every route but /v1/generations has

_BODY = {
    "requestBody": {
        "required": True,
        "description": "A PNG the service wrote (`image/png`), or a manifest (`application/json`).",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


async def read_body(request: Request) -> bytes:
    """The raw request body, refused with 413 past MAX_VERIFY_BYTES."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_VERIFY_BYTES:
            raise PayloadTooLarge(f"the body exceeds {describe(MAX_VERIFY_BYTES)}, this route's limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _response(result: Verification) -> VerifyResponse:
    return VerifyResponse(**result.as_dict(), manifest=result.manifest)


@router.post(
    "/verify",
    response_model=VerifyResponse,
    openapi_extra=_BODY,
    responses=error_responses(MalformedRequest, PayloadTooLarge, InvalidRequest, StorageUnavailable),
)
async def verify(request: Request, archive: ArchiveDep) -> VerifyResponse:
    """Check signature, pixels and ledger of a PNG, or the signature and ledger of a manifest."""
    body = await read_body(request)
    if not body:
        raise InvalidRequest("send a PNG (image/png) or a manifest (application/json) as the body", param="body")
    try:
        if body.startswith(PNG_SIGNATURE):
            result = await asyncio.to_thread(archive.verify_png, body)
        elif body.lstrip()[:1] in (b"{", b"["):
            try:
                document = parse_json(body)
            except ValueError as exc:
                raise MalformedRequest(f"the body is not valid JSON: {exc}", param="body") from None
            if not isinstance(document, dict):
                raise InvalidRequest("a manifest is a JSON object", param="body")
            result = await asyncio.to_thread(archive.verify_manifest, document)
        else:
            raise MalformedRequest("the body is neither a PNG nor a JSON manifest", param="body")
    except UnverifiableInput as exc:
        raise InvalidRequest(str(exc), param="body") from None
    return _response(result)


@router.get("/keys", response_model=KeyList)
async def list_keys(archive: ArchiveDep) -> KeyList:
    """Every public key that signed manifests on this server (old keys stay after rotation)."""
    return KeyList(keys=[PublicKeyInfo(**entry.describe()) for entry in archive.public_keys()])
