"""POST /v1/generations, and the ledger: GET /v1/generations[/{id}[/images/{k}.png]]."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.api.deps import ArchiveDep, GenerationDep
from app.api.json_bodies import JsonBodyRoute
from app.api.responses import GENERATION_ERRORS, LEDGER_ERRORS
from app.api.schemas import (
    GeneratedImage,
    GenerationFilters,
    GenerationPage,
    GenerationRecord,
    GenerationRequest,
    GenerationResponse,
    GenerationSummary,
    StoredImage,
)
from app.scheduler.work import utc_now
from app.store.archive import iso_utc
from app.store.ledger import GenerationQuery, GenerationRow, GenerationStatus

router = APIRouter(prefix="/v1", tags=["generations"], route_class=JsonBodyRoute)

GenerationId = Annotated[str, Path(pattern=r"^gen_[0-9a-f]{8,64}$", description="A generation id.")]
# A string, not an int: int parsing would take " 1", "+0" and "00" as indexes and give one image many URLs.
ImageIndex = Annotated[str, Path(pattern=r"^(0|[1-9][0-9]?)$", description="The image index in decimal: 0, 1, ...")]

def image_url(generation_id: str, index: int) -> str:
    """Path of one stored image on this server."""
    return f"/v1/generations/{generation_id}/images/{index}.png"


@router.post("/generations", response_model=GenerationResponse, responses=GENERATION_ERRORS)
async def create_generation(
    body: GenerationRequest, generations: GenerationDep, http_request: Request
) -> GenerationResponse:
    """Generate images deterministically; sign, embed and store them durably, then answer."""
    received = utc_now()
    params = generations.resolve(**body.param_fields())
    stored = await generations.create(
        params,
        reproducibility_key=body.reproducibility_key,
        received_at=received,
        disconnected=http_request.is_disconnected,
    )
    inline = body.response_format == "b64_png"
    return GenerationResponse(
        id=stored.manifest.id,
        images=[
            GeneratedImage(
                **image.hash_fields(),
                png_base64=base64.b64encode(png).decode("ascii") if inline else None,
                url=image_url(stored.manifest.id, image.index),
            )
            for image, png in zip(stored.manifest.images, stored.pngs, strict=True)
        ],
        manifest=stored.manifest,
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
            StoredImage(**i.hash_fields(), url=image_url(row.id, i.index) if stored else None)
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
    generation_id: GenerationId, index: ImageIndex, archive: ArchiveDep
) -> Response:
    """The stored PNG of one image, with its signed manifest embedded."""
    png = await asyncio.to_thread(archive.image_bytes, generation_id, int(index))
    # a stored image never changes under its id
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"})
