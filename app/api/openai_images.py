"""POST /v1/images/generations: the OpenAI Images API in front of the one generation path.

Errors on this route use OpenAI's body, `{"error": {"message", "type", "param", "code"}}` with Sameseed's
error type as `code`, and OpenAI's statuses (a parameter problem is 400, never 422), so the official
SDK raises its typed exceptions and honours Retry-After.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import GenerationDep
from app.api.generations import image_url
from app.api.openai_schemas import (
    UNHONOURED_FIELDS,
    OpenAIErrorResponse,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from app.api.schemas import GenerationRequest
from app.api.translation import front_door_note, generation_request, rename_param
from app.errors import InvalidRequest, MalformedRequest, SameseedError
from app.provenance.manifest import ManifestWarning

OPENAI_PATH_PREFIX = "/v1/images/"
DOOR = "the OpenAI Images API (POST /v1/images/generations)"
# Sameseed's names -> the OpenAI request's, so an error names the field the client sent.
PARAM_NAMES = {"width": "size", "height": "size", "num_images": "n"}
TRANSLATED = frozenset(
    {"prompt", "model", "n", "size", "response_format", "seed", "steps", "guidance_scale", "sampler", "negative_prompt"}
)
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(error: SameseedError) -> tuple[int, dict[str, Any]]:
    """OpenAI's status and body for a Sameseed error: 422 becomes 400, the Sameseed type becomes `code`."""
    status = 400 if error.status == 422 else error.status
    error = rename_param(error, PARAM_NAMES)
    body = {"error": {"message": error.message, "type": _openai_type(status), "param": error.param, "code": error.type}}
    return status, body


def openai_error_response(error: SameseedError) -> JSONResponse:
    """A JSONResponse in OpenAI's error shape, with the error's headers (Retry-After, WWW-Authenticate)."""
    status, body = openai_error(error)
    return JSONResponse(body, status_code=status, headers=error.headers())


def _from_validation(exc: RequestValidationError) -> SameseedError:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return MalformedRequest("We could not parse the JSON body of your request.")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing":
        message = f"Missing required parameter: {param!r}." if param else "A JSON object body is required."
        return InvalidRequest(message, param=param)
    if param is None:
        return InvalidRequest(f"The request body must be a JSON object: {first.get('msg')}.")
    return InvalidRequest(f"Invalid value for {param!r}: {first.get('msg')}.", param=param)


class OpenAIRoute(APIRoute):
    """A route whose every error, validation included, is answered in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler: body validation and domain errors become OpenAI errors."""
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return openai_error_response(_from_validation(exc))
            except SameseedError as exc:
                return openai_error_response(exc)
            except StarletteHTTPException as exc:  # a body FastAPI cannot decode, or one past the size limit
                kind = _openai_type(exc.status_code)
                detail = {"message": str(exc.detail), "type": kind, "param": None, "code": None}
                return JSONResponse({"error": detail}, status_code=exc.status_code)

        return openai_errors


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "A parameter is invalid or not honoured; `param` names it"},
    401: {"model": OpenAIErrorResponse, "description": "API keys are on and the key is missing or wrong"},
    404: {"model": OpenAIErrorResponse, "description": "Unknown model"},
    429: {"model": OpenAIErrorResponse, "description": "Queue full; see Retry-After"},
    503: {"model": OpenAIErrorResponse, "description": "Not ready, model unavailable, or worker lost"},
    504: {"model": OpenAIErrorResponse, "description": "Deadline passed"},
}


def to_generation_request(body: OpenAIImageRequest) -> tuple[GenerationRequest, ManifestWarning]:
    """Sameseed's request for an OpenAI one, and the note recording what was accepted without effect."""
    for name, (allowed, why) in UNHONOURED_FIELDS.items():
        value = getattr(body, name)
        if value is not None and value != allowed:
            raise InvalidRequest(
                f"{name}={value!r} cannot be honoured: {why}. Sameseed refuses it rather than ignore a field "
                "that changes the image",
                param=name,
            )
    width = height = None
    if body.size is not None and body.size != "auto":
        match = _SIZE.match(body.size)
        if match is None:
            raise InvalidRequest(f"size must be `WxH` (e.g. 512x512) or `auto`; got {body.size!r}", param="size")
        width, height = int(match.group(1)), int(match.group(2))
    fields = {
        "prompt": body.prompt,
        "model": body.model,
        "negative_prompt": body.negative_prompt,
        "seed": body.seed,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "width": width,
        "height": height,
        "sampler": body.sampler,
        "num_images": body.n,
        "response_format": "url" if body.response_format == "url" else "b64_png",
    }
    request = generation_request({k: v for k, v in fields.items() if v is not None}, PARAM_NAMES)
    without_effect = {name: getattr(body, name) for name in body.model_fields_set - TRANSLATED}
    return request, front_door_note(DOOR, without_effect)


@router.post(
    "/images/generations",
    response_model=OpenAIImagesResponse,
    responses=OPENAI_ERRORS,
    operation_id="create_openai_image",
)
async def create_openai_image(
    body: OpenAIImageRequest, generations: GenerationDep, http_request: Request
) -> OpenAIImagesResponse:
    """OpenAI's `images.generate`: the same images, hashes and signed manifest as POST /v1/generations."""
    created = int(time.time())
    request, note = to_generation_request(body)
    archived = await generations.create(
        generations.resolve(**request.param_fields()),
        reproducibility_key=request.reproducibility_key,
        disconnected=http_request.is_disconnected,
        notes=[note],
    )
    manifest = archived.manifest
    inline = request.response_format == "b64_png"
    base = str(http_request.base_url).rstrip("/")
    return OpenAIImagesResponse(
        created=created,
        data=[
            OpenAIImage(
                b64_json=base64.b64encode(png).decode("ascii") if inline else None,
                url=None if inline else base + image_url(manifest.id, image.index),
                index=image.index,
                seed=image.seed,
                latent_sha256=image.latent_sha256,
                pixel_sha256=image.pixel_sha256,
            )
            for image, png in zip(manifest.images, archived.pngs, strict=True)
        ],
        size=f"{manifest.request.width}x{manifest.request.height}",
        id=manifest.id,
        manifest=manifest,
    )
