"""POST /v1/generations."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from app.api.deps import DispatcherDep
from app.api.responses import ERROR_RESPONSES
from app.dispatcher import utc_now
from app.schemas import GeneratedImage, GenerationRequest, GenerationResponse

router = APIRouter(prefix="/v1", tags=["generations"])


@router.post("/generations", response_model=GenerationResponse, responses=ERROR_RESPONSES)
async def create_generation(
    body: GenerationRequest, dispatcher: DispatcherDep, http_request: Request
) -> GenerationResponse:
    """Generate images deterministically and return them with their manifest and hashes."""
    received = utc_now()
    outcome = await dispatcher.generate(body, received_at=received, disconnected=http_request.is_disconnected)
    return GenerationResponse(
        id=outcome.id,
        images=[
            GeneratedImage(
                index=image.index,
                seed=image.seed,
                png_base64=base64.b64encode(image.png).decode("ascii"),
                latent_sha256=image.latent_sha256,
                pixel_sha256=image.pixel_sha256,
            )
            for image in outcome.images
        ],
        manifest=outcome.manifest,
    )
