"""POST /v1/generations, and the ledger: GET /v1/generations[/{id}[/images/{k}.png]]."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.api.deps import ArchiveDep, DispatcherDep
from app.api.responses import ERROR_RESPONSES
from app.archive import iso_utc
from app.ledger import GenerationQuery, GenerationRow, GenerationStatus
from app.schemas import (
    ErrorResponse,
    GeneratedImage,
    GenerationFilters,
    GenerationPage,
    GenerationRecord,
    GenerationRequest,
    GenerationResponse,
    GenerationSummary,
    StoredImage,
)
from app.services.generation import generate_and_store

router = APIRouter(prefix="/v1", tags=["generations"])

GenerationId = Annotated[str, Path(pattern=r"^gen_[0-9a-f]{8,64}$", description="A generation id.")]
LEDGER_ERRORS = {
    404: {"model": ErrorResponse, "description": "No such generation or image"},
    410: {"model": ErrorResponse, "description": "The image file was pruned; the manifest remains"},
    422: {"model": ErrorResponse, "description": "A parameter is invalid; `param` names it"},
}


def image_url(generation_id: str, index: int) -> str:
    """Path of one stored image on this server."""
    return f"/v1/generations/{generation_id}/images/{index}.png"


GENERATION_ERRORS = {
    **ERROR_RESPONSES,
    409: {"model": ErrorResponse, "description": "No worker has the requested reproducibility_key"},
    413: {"model": ErrorResponse, "description": "Body over 1 MiB"},
    500: {"model": ErrorResponse, "description": "The pipeline raised (generation_failed)"},
}


@router.post("/generations", response_model=GenerationResponse, responses=GENERATION_ERRORS)
async def create_generation(
    body: GenerationRequest, dispatcher: DispatcherDep, archive: ArchiveDep, http_request: Request
) -> GenerationResponse:
    """Generate images deterministically; sign, embed and store them durably, then answer."""
    archived = await generate_and_store(
        body, dispatcher=dispatcher, archive=archive, disconnected=http_request.is_disconnected
    )
    inline = body.response_format == "b64_png"
    return GenerationResponse(
        id=archived.manifest.id,
        images=[
            GeneratedImage(
                index=image.index,
                seed=image.seed,
                png_base64=base64.b64encode(png).decode("ascii") if inline else None,
                url=image_url(archived.manifest.id, image.index),
                latent_sha256=image.latent_sha256,
                pixel_sha256=image.pixel_sha256,
            )
            for image, png in zip(archived.manifest.images, archived.pngs, strict=True)
        ],
        manifest=archived.manifest,
    )


def _summary(row: GenerationRow) -> dict:
    stored = row.status is GenerationStatus.STORED
    return {
        "id": row.id,
        "status": row.status.value,
        "model": row.model,
        "reproducibility_key": row.reproducibility_key,
        "received_at": row.received_at,
        "finished_at": row.finished_at,
        "stored_at": row.stored_at,
        "pruned_at": row.pruned_at,
        "key_id": row.key_id,
        "images": [
            StoredImage(
                index=i.index,
                seed=i.seed,
                latent_sha256=i.latent_sha256,
                pixel_sha256=i.pixel_sha256,
                width=i.width,
                height=i.height,
                url=image_url(row.id, i.index) if stored else None,
            )
            for i in row.images
        ],
    }


@router.get("/generations", response_model=GenerationPage, responses=LEDGER_ERRORS)
async def list_generations(filters: Annotated[GenerationFilters, Query()], archive: ArchiveDep) -> GenerationPage:
    """Stored generations matching every filter, newest first, one page at a time."""
    query = GenerationQuery(
        model=filters.model,
        reproducibility_key=filters.reproducibility_key,
        latent_sha256=filters.latent_sha256,
        pixel_sha256=filters.pixel_sha256,
        received_from=iso_utc(filters.since) if filters.since else None,
        received_before=iso_utc(filters.until) if filters.until else None,
        status=GenerationStatus(filters.status) if filters.status else None,
    )
    before = int(filters.cursor[1:]) if filters.cursor else None
    rows = await asyncio.to_thread(archive.find, query, before_seq=before, limit=filters.limit + 1)
    page = rows[: filters.limit]
    return GenerationPage(
        data=[GenerationSummary(**_summary(row)) for row in page],
        next_cursor=f"c{page[-1].seq}" if len(rows) > filters.limit else None,
    )


@router.get("/generations/{generation_id}", response_model=GenerationRecord, responses=LEDGER_ERRORS)
async def get_generation(generation_id: GenerationId, archive: ArchiveDep) -> GenerationRecord:
    """One generation from the ledger: its signed manifest and image links."""
    row = await asyncio.to_thread(archive.get, generation_id)
    return GenerationRecord(**_summary(row), manifest=json.loads(row.manifest))


@router.get(
    "/generations/{generation_id}/images/{index}.png",
    response_class=Response,
    responses={**LEDGER_ERRORS, 200: {"content": {"image/png": {}}, "description": "The PNG, manifest embedded"}},
)
async def get_image(
    generation_id: GenerationId, index: Annotated[int, Path(ge=0, le=63)], archive: ArchiveDep
) -> Response:
    """The stored PNG of one image, with its signed manifest embedded."""
    png = await asyncio.to_thread(archive.image_bytes, generation_id, index)
    # a stored image never changes under its id
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"})
