"""HTTP schemas of the OpenAI Images API front door (POST /v1/images/generations)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import MAX_IMAGES, MAX_SEED
from app.pipeline.samplers import SamplerName
from app.provenance.manifest import Manifest

# OpenAI fields that would change the image and that Sameseed cannot honour: any value is refused
# (400 naming the field) rather than dropped, except the one value that is what Sameseed does anyway.
UNHONOURED_FIELDS: dict[str, tuple[object, str]] = {
    "quality": (None, "Sameseed has no quality tiers; set `steps` (extra_body) instead"),
    "style": (None, "Sameseed has no styles; describe the style in the prompt"),
    "background": (None, "Sameseed draws opaque images only"),
    "complexity": (None, "Sameseed has no planning stage"),
    "output_compression": (None, "Sameseed answers lossless PNG only"),
    "output_format": ("png", "Sameseed answers PNG only"),
    "partial_images": (0, "Sameseed does not stream partial images"),
    "stream": (False, "Sameseed does not stream"),
    "frame_count": (None, "Sameseed draws still images only"),
    "frame_duration_ms": (None, "Sameseed draws still images only"),
    "svg": (None, "Sameseed draws raster images only"),
}
# OpenAI fields that cannot change the image: accepted and recorded in the manifest.
RECORDED_FIELDS = ("user", "safety_identifier", "moderation")


class OpenAIImageRequest(BaseModel):
    """What `client.images.generate(...)` sends, plus Sameseed's parameters through `extra_body`."""

    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=20_000)

    prompt: Annotated[str, Field(min_length=1, description="What to draw.")]
    model: Annotated[str | None, Field(description="A Sameseed registry id (GET /v1/models); absent: default.")] = None
    n: Annotated[int | None, Field(ge=1, le=MAX_IMAGES, description="Images; image k uses seed + k.")] = None
    size: Annotated[
        str | None, Field(description="`WxH` within the model's limits, or `auto` for the model's default size.")
    ] = None
    response_format: Annotated[
        Literal["b64_json", "url"] | None,
        Field(description="b64_json (default): the PNG inline; url: an absolute link to the stored PNG."),
    ] = None
    # Sameseed's own parameters (the SDK's `extra_body`).
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Absent: the server draws one.")] = None
    steps: Annotated[int | None, Field(ge=1, le=1000)] = None
    guidance_scale: Annotated[float | None, Field(ge=0, le=100, allow_inf_nan=False)] = None
    sampler: SamplerName | None = None
    negative_prompt: Annotated[str | None, Field(description="What to steer away from.")] = None
    # Accepted and recorded: they do not change the image.
    user: str | None = None
    safety_identifier: str | None = None
    moderation: Annotated[str | None, Field(description="Accepted; Sameseed moderates nothing.")] = None
    # Refused unless absent (or the value Sameseed uses anyway): see UNHONOURED_FIELDS.
    quality: Any = None
    style: Any = None
    background: Any = None
    complexity: Any = None
    output_compression: Any = None
    output_format: Any = None
    partial_images: Any = None
    stream: Any = None
    frame_count: Any = None
    frame_duration_ms: Any = None
    svg: Any = None


class OpenAIImage(BaseModel):
    """One image: OpenAI's fields, then Sameseed's (the SDK keeps extra keys)."""

    b64_json: str | None = Field(description="Base64 PNG (signed manifest embedded); null with response_format=url.")
    url: str | None = Field(description="Absolute URL of the stored PNG; null with response_format=b64_json.")
    revised_prompt: None = Field(default=None, description="Always null: Sameseed never rewrites a prompt.")
    index: int
    seed: int
    latent_sha256: str
    pixel_sha256: str


class OpenAIImagesResponse(BaseModel):
    """200 answer: OpenAI's `{created, data}` plus the generation id and the signed manifest."""

    created: int = Field(description="Unix seconds when the request was received.")
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str = Field(description="`WxH` of the images.")
    id: str = Field(description="The Sameseed generation id (GET /v1/generations/{id}).")
    manifest: Manifest


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error object; `code` is Sameseed's error type."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, used on the OpenAI routes only."""

    error: OpenAIErrorDetail
