"""HTTP request and response models (unknown fields refused, bounds in Field)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from app.params import MAX_SEED, STRICT, CaseResult, ImageHashes
from app.pipeline.samplers import SamplerName
from app.provenance.manifest import Manifest

MAX_IMAGES = 8


class GenerationRequest(BaseModel):
    """POST /v1/generations: a prompt and every parameter; absent ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=20_000)

    @field_validator("seed", "steps", "width", "height", "num_images", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        """Take 5.0 as 5: JSON Schema (and so the OpenAPI spec) calls any number with zero fraction an integer."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # A NUL cannot be written into a PNG text chunk, and no tokenizer gives it meaning.
        if "\x00" in value:
            raise ValueError("must not contain a NUL character (\\u0000)")
        return value

    model: Annotated[
        str | None,
        Field(description="Registry id; absent: the server's default model.", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$"),
    ] = None
    prompt: Annotated[str, Field(min_length=1, description="What to draw.")]
    negative_prompt: Annotated[str, Field(description="What to steer away from.")] = ""
    seed: Annotated[
        int | None,
        Field(ge=0, le=MAX_SEED, description="0..2^53-1; absent: the server draws one and returns it."),
    ] = None
    # Ranges of steps, guidance and size are the model's (GET /v1/models `limits`), checked in one place
    # (the generation service), so every out-of-range value gets the same message naming the model's limit.
    steps: Annotated[
        int | None, Field(description="Denoising steps, from 1 to the model's limits.max_steps (GET /v1/models).")
    ] = None
    guidance_scale: Annotated[
        float | None,
        Field(
            allow_inf_nan=False,
            description="Classifier-free guidance scale, from 0 to the model's limits.max_guidance_scale.",
        ),
    ] = None
    width: Annotated[
        int | None,
        Field(description="Pixels: a multiple of the model's limits.size_multiple within its min_size..max_size."),
    ] = None
    height: Annotated[
        int | None,
        Field(description="Pixels: a multiple of the model's limits.size_multiple within its min_size..max_size."),
    ] = None
    sampler: Annotated[SamplerName | None, Field(description="Sampler name; see GET /v1/samplers.")] = None
    num_images: Annotated[
        int, Field(ge=1, le=MAX_IMAGES, description="Image k uses seed + k, generated on its own.")
    ] = 1
    reproducibility_key: Annotated[
        str | None,
        Field(
            pattern=r"^rk1-[0-9a-f]{64}$",
            description="Run only on workers with this key (replays); 409 when none has it.",
        ),
    ] = None
    response_format: Annotated[
        Literal["b64_png", "url"],
        Field(description="b64_png: images inline as base64 PNG; url: links only (GET the `url`)."),
    ] = "b64_png"
    previews: Annotated[
        bool,
        Field(
            description=(
                "Jobs only (`Prefer: respond-async` or `Accept: text/event-stream`): each `step` event carries "
                "`preview`, a low-resolution base64 PNG approximated from the latents. Not a generation "
                "parameter: never changes the images, their hashes or the manifest."
            ),
        ),
    ] = False

    def param_fields(self) -> dict[str, Any]:
        """The generation parameters given (absent ones None), for the service to resolve."""
        return self.model_dump(exclude={"reproducibility_key", "response_format", "previews"})


@dataclass(frozen=True, config=STRICT)
class GeneratedImage(ImageHashes):
    """One image of a generation response: its hashes, and the PNG inline or by link."""

    png_base64: str | None = Field(description="The PNG (signed manifest embedded); null with response_format=url.")
    url: str = Field(description="Path of the stored PNG on this server.")


class GenerationResponse(BaseModel):
    """200 answer to POST /v1/generations."""

    id: str
    images: list[GeneratedImage]
    manifest: Manifest


class StepProgress(BaseModel):
    """The step a running job last finished."""

    index: int = Field(description="The image being rendered.")
    step: int = Field(description="Denoising steps finished of this image.")
    steps: int = Field(description="Denoising steps of this image in all.")


class JobStatus(BaseModel):
    """GET /v1/generations/{id} of a job (202 of `Prefer: respond-async`): where it is, and its answer once done."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "canceled"]
    received_at: str
    updated_at: str
    num_images: int
    images_done: int
    steps_done: int = Field(description="Denoising steps finished over all images (a canceled job: where it stopped).")
    queue_position: int | None = Field(description="1: starts next; null unless queued.")
    progress: StepProgress | None = Field(description="The last finished step while running.")
    error: ErrorDetail | None = Field(description="Why it failed or was canceled.")
    result: GenerationResponse | None = Field(description="Once succeeded: the answer a synchronous POST gives.")


class ErrorDetail(BaseModel):
    """The body of every error."""

    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error body shape."""

    error: ErrorDetail


class WorkerStatus(BaseModel):
    """One worker as /readyz reports it."""

    id: str
    device: str
    state: str
    pid: int | None
    jobs_done: int
    restarts: int
    last_error: str | None
    torch_threads: int | None
    cpu_capability: str | None
    group_key: str | None
    models: dict[str, str | None] = Field(description="Loaded model id -> its reproducibility key.")
    ready_seconds: float | None
    cobatch: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The worker's co-batching proof per (model, width, height, size): proven (co-batched) or not, "
        "and why not. Unproven shapes run singly.",
    )
    consistency: str | None = Field(
        default=None, description="Golden-check state: consistent, baseline_recorded, drifted or unchecked."
    )


class StorageStatus(BaseModel):
    """Whether the data dir (ledger and image store) can be written now."""

    ok: bool
    error: str | None = Field(description="Why not (disk full, read-only, ...); null when writes work.")
    ledger: str = Field(default="sqlite", description="The ledger's backend: sqlite or postgresql.")


class ReadyResponse(BaseModel):
    """GET /readyz: ready when not draining, storage writes work and a worker takes user work."""

    ready: bool
    draining: bool
    queue_depth: int
    storage: StorageStatus
    checking: list[str] = Field(
        description="Workers loaded but held out of user work until their golden check passes."
    )
    workers: list[WorkerStatus]
    warnings: list[str] = Field(default_factory=list, description="Unsafe settings in force (anonymous access).")


class HealthResponse(BaseModel):
    """GET /healthz: the process is alive."""

    status: str
    version: str


class ModelInfo(BaseModel):
    """One registered model as GET /v1/models lists it."""

    id: str
    family: str
    description: str
    source_kind: str
    dtype: str
    default: bool
    defaults: dict[str, Any]
    limits: dict[str, Any]
    pinned_files: int


class ModelList(BaseModel):
    """GET /v1/models."""

    default_model: str
    models: list[ModelInfo]


class SamplerInfo(BaseModel):
    """One sampler as GET /v1/samplers lists it."""

    name: str
    scheduler_class: str
    description: str
    stochastic: bool
    overrides: dict[str, Any]


class SamplerList(BaseModel):
    """GET /v1/samplers."""

    samplers: list[SamplerInfo]


SHA256_PATTERN = r"^[0-9a-f]{64}$"
_NUMBER = re.compile(r"^[+-]?[0-9]+(\.[0-9]*)?$")


class GenerationFilters(BaseModel):
    """GET /v1/generations query: every given filter must match; newest first; `cursor` from the last page."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str | None, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Registry id.")] = None
    reproducibility_key: Annotated[str | None, Field(pattern=r"^rk1-[0-9a-f]{64}$")] = None
    latent_sha256: Annotated[str | None, Field(pattern=SHA256_PATTERN, description="Any image has it.")] = None
    pixel_sha256: Annotated[str | None, Field(pattern=SHA256_PATTERN, description="Any image has it.")] = None
    since: Annotated[datetime | None, Field(description="Received at or after (ISO 8601; no zone: UTC).")] = None
    until: Annotated[datetime | None, Field(description="Received before (ISO 8601; no zone: UTC).")] = None
    status: Literal["stored", "pruned"] | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str | None, Field(pattern=r"^c[0-9]{1,18}$", description="next_cursor of the last page.")] = (
        None
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        """Refuse bare numbers, which pydantic would read as Unix seconds."""
        # pydantic reads a bare number as Unix seconds: `since=2024` would mean 1970-01-01T00:33:44Z
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            raise ValueError("expected an ISO 8601 date or date-time (e.g. 2024-05-01T12:00:00Z), not a number")
        return value

    @field_validator("since", "until")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        """The time in UTC (no zone: UTC); 422 rather than an overflow for times beyond year 1 or 9999."""
        if value is None:
            return None
        try:
            return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
        except OverflowError:
            raise ValueError("the time is out of range once converted to UTC") from None


@dataclass(frozen=True, config=STRICT)
class StoredImage(ImageHashes):
    """One image of a stored generation: its hashes and where its PNG is."""

    url: str | None = Field(description="Path of the PNG on this server; null once retention pruned it.")


class GenerationSummary(BaseModel):
    """One generation as the ledger lists it."""

    id: str
    status: Literal["stored", "pruned"]
    model: str
    reproducibility_key: str
    received_at: str
    finished_at: str
    stored_at: str
    pruned_at: str | None
    key_id: str | None = Field(description="Id of the key that signed the manifest (GET /v1/keys).")
    images: list[StoredImage]


class GenerationRecord(GenerationSummary):
    """GET /v1/generations/{id}: the ledger row, image links and the signed manifest."""

    manifest: dict[str, Any]


class GenerationPage(BaseModel):
    """GET /v1/generations: one page, newest first."""

    data: list[GenerationSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class C2paStatusCodes(BaseModel):
    """The C2PA validation status codes of the active manifest, by kind."""

    failure: list[str]
    informational: list[str]
    success: list[str]


class C2paSigner(BaseModel):
    """The C2PA claim signer, as its certificate names it."""

    common_name: str | None
    issuer: str | None
    algorithm: str | None
    cert_serial_number: str | None


class C2paResult(BaseModel):
    """A PNG's C2PA Content Credentials as the C2PA SDK validates them."""

    present: bool = Field(description="The PNG carries a C2PA manifest store.")
    valid: bool | None = Field(description="The SDK's validation state is Valid or Trusted; null: none present.")
    trusted: bool | None = Field(description="The signer chains to a configured trust anchor (state Trusted).")
    validation_state: str | None = Field(description="The SDK's: Invalid, Valid or Trusted.")
    validation_status: C2paStatusCodes
    signer: C2paSigner | None
    digital_source_type: str | None = Field(description="The c2pa.created action's IPTC digital source type.")
    sameseed: dict[str, Any] | None = Field(description="The org.sameseed.manifest assertion.")
    matches_manifest: bool | None = Field(description="That assertion names the manifest this PNG embeds.")
    reason: str | None


class VerifyResponse(BaseModel):
    """POST /v1/verify: what the service can prove about a PNG or a manifest."""

    valid: bool = Field(description="signature_valid, and pixels_match unless only a manifest was given.")
    signature_valid: bool
    key_id: str | None
    generation_id: str | None
    pixels_match: bool | None = Field(description="The pixels hash to an image of the manifest; null: no PNG given.")
    image_index: int | None
    known_to_ledger: bool = Field(description="This server's ledger holds this very manifest.")
    reasons: list[str] = Field(description="Why a check failed; empty when valid and known.")
    c2pa: C2paResult | None = Field(
        description="The PNG's C2PA Content Credentials, beside the Ed25519 result (not part of `valid`); "
        "null for a bare manifest."
    )
    manifest: dict[str, Any] | None


class PublicKeyInfo(BaseModel):
    """One manifest-signing public key."""

    key_id: str
    algorithm: Literal["ed25519"]
    public_key: str = Field(description="Base64 of the raw 32-byte Ed25519 public key.")
    public_key_pem: str
    active: bool = Field(description="Signs new manifests; the others signed older ones.")


class KeyList(BaseModel):
    """GET /v1/keys: every key that ever signed here, the active one first."""

    keys: list[PublicKeyInfo]


@dataclass(frozen=True)
class ConsistencyCase(CaseResult):
    """One golden case on one worker: the verdict, expected vs actual hashes, and the error if it failed."""


class ConsistencyWorker(BaseModel):
    """One worker's golden-check state."""

    id: str
    state: str = Field(description="consistent, baseline_recorded, drifted or unchecked")
    worker_state: str = Field(description="ready, busy, quarantined, ... as in /readyz")
    reproducibility_keys: dict[str, str | None]
    last_check: str | None
    checks_run: int
    mismatches: int
    cases: list[ConsistencyCase]


class ConsistencyReport(BaseModel):
    """GET /v1/consistency."""

    status: str
    suite_version: int
    interval_s: float
    quarantine_on_drift: bool
    workers: list[ConsistencyWorker]


class BaselineImportResult(BaseModel):
    """PUT /v1/consistency/baselines."""

    imported: int
    replaced_all: bool


class ReplayImage(BaseModel):
    """One image of a replay: both hashes of each kind, whether they match, and the drift when measurable."""

    index: int
    seed: int
    latent_match: bool
    pixel_match: bool
    original_latent_sha256: str
    replay_latent_sha256: str
    original_pixel_sha256: str
    replay_pixel_sha256: str
    latent_drift: dict[str, Any] | None = Field(description="Set when the original latents are at hand (ledger).")
    pixel_drift: dict[str, Any] | None = Field(description="Set when the original pixels are at hand (PNG, ledger).")


class ReplayOf(BaseModel):
    """The replay's own generation: its id and manifest (not stored in the ledger)."""

    id: str
    manifest: dict[str, Any]


class ReplayResponse(BaseModel):
    """POST /v1/reproduce: the verdict, per-image hashes and drift, key differences and notes."""

    verdict: Literal["identical", "different"]
    identical: bool
    source: Literal["manifest", "png", "ledger"]
    original_id: str
    original_reproducibility_key: str
    replay_reproducibility_key: str
    same_key: bool = Field(description="Whether the replay ran under the original's reproducibility key.")
    differences: list[dict[str, Any]] = Field(description="Manifest fields that differ, and whether each is keyed.")
    images: list[ReplayImage]
    signature: dict[str, Any] | None = Field(description="The original manifest's signature check, when signed.")
    notes: list[str]
    replay: ReplayOf
