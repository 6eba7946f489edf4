"""POST /v1/generations (synchronous, `Prefer: respond-async`, or an event stream), jobs' status, events and
cancellation, and the ledger: GET /v1/generations[/{id}[/images/{k}.png]]."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from app.api.deps import ArchiveDep, GenerationDep, JobsDep, OwnerDep
from app.api.json_bodies import JsonBodyRoute
from app.api.responses import GENERATION_ERRORS, JOB_ERRORS, LEDGER_ERRORS
from app.api.schemas import (
    GeneratedImage,
    GenerationFilters,
    GenerationPage,
    GenerationRecord,
    GenerationRequest,
    GenerationResponse,
    GenerationSummary,
    JobStatus,
    StoredImage,
)
from app.errors import GenerationNotFound, InvalidRequest
from app.provenance.manifest import Manifest
from app.services.jobs import JobEvent
from app.store.ledger import GenerationQuery, GenerationRow, GenerationStatus
from app.timestamps import iso_utc, utc_now

router = APIRouter(prefix="/v1", tags=["generations"], route_class=JsonBodyRoute)

GenerationId = Annotated[str, Path(pattern=r"^gen_[0-9a-f]{8,64}$", description="A generation id.")]
# A string, not an int: int parsing would take " 1", "+0" and "00" as indexes and give one image many URLs.
ImageIndex = Annotated[str, Path(pattern=r"^(0|[1-9][0-9]?)$", description="The image index in decimal: 0, 1, ...")]

def image_url(generation_id: str, index: int) -> str:
    """Path of one stored image on this server."""
    return f"/v1/generations/{generation_id}/images/{index}.png"


def generation_response(manifest: Manifest, pngs: list[bytes] | None, response_format: str) -> GenerationResponse:
    """The answer of a synchronous POST: hashes, links, the PNGs inline for `b64_png`, the signed manifest."""
    inline = response_format == "b64_png" and pngs is not None
    return GenerationResponse(
        id=manifest.id,
        images=[
            GeneratedImage(
                **image.hash_fields(),
                png_base64=base64.b64encode(pngs[image.index]).decode("ascii") if inline else None,
                url=image_url(manifest.id, image.index),
            )
            for image in manifest.images
        ],
        manifest=manifest,
    )


def present_result(manifest: Manifest, pngs: list[bytes] | None, response_format: str) -> dict[str, Any]:
    """A finished job's result as JSON: exactly what the synchronous POST answers."""
    return generation_response(manifest, pngs, response_format).model_dump(mode="json")


def _wants(header: str | None, token: str) -> bool:
    return header is not None and token in header.lower()


ASYNC_AND_STREAM = {
    202: {"model": JobStatus, "description": "With `Prefer: respond-async`: the job was accepted (see `Location`)."},
    200: {
        "model": GenerationResponse,
        "description": "The generation; with `Accept: text/event-stream` its events, ending with `succeeded`.",
        "content": {"text/event-stream": {}},
    },
}


@router.post("/generations", response_model=GenerationResponse, responses={**GENERATION_ERRORS, **ASYNC_AND_STREAM})
async def create_generation(
    body: GenerationRequest,
    generations: GenerationDep,
    jobs: JobsDep,
    owner: OwnerDep,
    http_request: Request,
    prefer: Annotated[str | None, Header(description="`respond-async`: answer 202 at once.")] = None,
    accept: Annotated[str | None, Header(description="`text/event-stream`: stream the job's events.")] = None,
) -> Any:  # noqa: ANN401 - a GenerationResponse, a 202 JSONResponse or an event stream
    """Generate images deterministically; sign, embed and store them durably, then answer (or 202, or stream)."""
    received = utc_now()
    params = generations.resolve(**body.param_fields())
    options = {
        "response_format": body.response_format, "reproducibility_key": body.reproducibility_key,
        "owner": owner, "received_at": received, "previews": body.previews,
    }
    if _wants(prefer, "respond-async"):
        job = await jobs.submit(params, durable=True, **options)
        status = JobStatus.model_validate(jobs.describe(job)).model_dump(mode="json")
        headers = {"Location": f"/v1/generations/{job.id}", "Preference-Applied": "respond-async"}
        return JSONResponse(status, status_code=202, headers=headers)
    if _wants(accept, "text/event-stream"):
        job = await jobs.submit(params, durable=False, **options)
        # the job's id before any event: another client can read its status or cancel it meanwhile
        headers = {"Content-Location": f"/v1/generations/{job.id}", "Cache-Control": "no-store"}
        return EventSourceResponse(_sse(job.follow(), on_close=lambda: jobs.abandon(job)), headers=headers)
    if body.previews:  # a synchronous answer has no step events to carry them: refused, not silently ignored
        raise InvalidRequest(
            "previews come with step events: ask with `Prefer: respond-async` or `Accept: text/event-stream`",
            param="previews",
        )
    stored = await generations.create(
        params,
        reproducibility_key=body.reproducibility_key,
        received_at=received,
        disconnected=http_request.is_disconnected,
    )
    return generation_response(stored.manifest, stored.pngs, body.response_format)


async def _sse(
    events: AsyncIterator[JobEvent | None], on_close: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """Server-Sent Events: `event` is the event name, `id` its number, `data` its JSON; comments keep it alive."""
    try:
        async for event in events:
            if event is None:
                yield format_sse_event(comment="keepalive")
                continue
            yield _wire(event)
    finally:
        if on_close is not None:  # a no-op once the job ended; else the client left: stop its work
            on_close()


@functools.lru_cache(maxsize=1024)  # keyed by the event object itself (JobEvent compares by identity)
def _wire(event: JobEvent) -> bytes:
    """The event in the SSE wire format, encoded once however many streams send it."""
    return format_sse_event(data_str=event.data_json, event=event.name, id=str(event.id))


@router.get(
    "/generations/{generation_id}/events",
    response_class=Response,
    responses={**JOB_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "The job's events"}},
)
async def generation_events(
    generation_id: GenerationId,
    jobs: JobsDep,
    owner: OwnerDep,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (sent back by EventSource clients).")
    ] = None,
) -> Response:
    """The job's events as Server-Sent Events, from after `Last-Event-ID`, until its final event."""
    after = 0
    if last_event_id is not None and last_event_id.strip():
        if not last_event_id.strip().isdigit():
            raise InvalidRequest(f"Last-Event-ID must be an event id (an integer); got {last_event_id[:40]!r}",
                                 param="Last-Event-ID")
        after = int(last_event_id.strip())
    events = await jobs.events(generation_id, owner, after)
    return EventSourceResponse(_sse(events), headers={"Cache-Control": "no-store"})


@router.post("/generations/{generation_id}/cancel", response_model=JobStatus, responses=JOB_ERRORS)
async def cancel_generation(generation_id: GenerationId, jobs: JobsDep, owner: OwnerDep) -> JobStatus:
    """Cancel a job: a queued one is removed at once, a running one stops at its next step; answers its status."""
    job = jobs.find(generation_id, owner)
    if job is not None:
        await jobs.cancel_and_settle(job)
        return JobStatus.model_validate(jobs.describe(job))
    status = await jobs.status(generation_id, owner)  # finished earlier: cancel changes nothing
    if status is None:
        raise GenerationNotFound(
            f"no job {generation_id!r}: only jobs submitted with `Prefer: respond-async` or an event stream "
            "can be canceled", param="generation_id",
        )
    return JobStatus.model_validate(status)


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


@router.get(
    "/generations/{generation_id}", response_model=JobStatus | GenerationRecord, responses=LEDGER_ERRORS
)
async def get_generation(
    generation_id: GenerationId, archive: ArchiveDep, jobs: JobsDep, owner: OwnerDep
) -> JobStatus | GenerationRecord:
    """A job's status (queued, running, succeeded with its result, failed, canceled), or a synchronous
    generation from the ledger: its signed manifest and image links."""
    status = await jobs.status(generation_id, owner)
    if status is not None:
        return JobStatus.model_validate(status)
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
