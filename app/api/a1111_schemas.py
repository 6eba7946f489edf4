"""HTTP schemas of the AUTOMATIC1111 front door (/sdapi/v1/...), as A1111 clients such as webuiapi send them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import MAX_IMAGES, MAX_SEED
from app.provenance.manifest import Manifest

# A1111 features Sameseed does not have. Clients send every field with A1111's default, so the
# value that means "off" (or null) is accepted (and recorded); any other value is a 422 naming the field.
UNSUPPORTED_FEATURES: dict[str, tuple[tuple[Any, ...], str]] = {
    "enable_hr": ((False,), "hires fix"),
    "restore_faces": ((False,), "face restoration"),
    "tiling": ((False,), "tiling"),
    "styles": (([],), "prompt styles (they rewrite the prompt)"),
    "subseed_strength": ((0,), "variation seeds"),
    "seed_resize_from_h": ((0, -1), "seed resize"),
    "seed_resize_from_w": ((0, -1), "seed resize"),
    "s_churn": ((0,), "sampler churn"),
    "s_noise": ((1,), "a sampler noise multiplier"),
    "script_name": (("",), "scripts"),
    "script_args": (([],), "scripts"),
    "alwayson_scripts": (({},), "alwayson scripts (extensions)"),
    "refiner_checkpoint": (("", "None"), "a refiner"),
    "init_images": (([],), "img2img (POST /sdapi/v1/img2img is not served)"),
    "mask": (("",), "inpainting"),
}


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img: A1111's fields; unknown fields are refused (422), never dropped."""

    model_config = ConfigDict(extra="forbid", str_max_length=20_000)

    prompt: Annotated[str, Field(description="What to draw (A1111 allows empty; Sameseed needs a prompt).")] = ""
    negative_prompt: str = ""
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED, description="-1: the server draws one.")] = -1
    steps: Annotated[int | None, Field(ge=1, le=1000)] = None
    cfg_scale: Annotated[float | None, Field(ge=0, le=100, allow_inf_nan=False)] = None
    width: Annotated[int | None, Field(ge=8, le=8192)] = None
    height: Annotated[int | None, Field(ge=8, le=8192)] = None
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    n_iter: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    eta: Annotated[float | None, Field(allow_inf_nan=False, description="Must match the sampler's own eta.")] = None
    override_settings: dict[str, Any] | None = None
    # Refused unless "off" (UNSUPPORTED_FEATURES).
    enable_hr: Any = None
    restore_faces: Any = None
    tiling: Any = None
    styles: Any = None
    subseed_strength: Any = None
    seed_resize_from_h: Any = None
    seed_resize_from_w: Any = None
    s_churn: Any = None
    s_noise: Any = None
    script_name: Any = None
    script_args: Any = None
    alwayson_scripts: Any = None
    refiner_checkpoint: Any = None
    init_images: Any = None
    mask: Any = None
    # No effect on a txt2img image here (hires-fix settings while hires fix is off, saving, the
    # deprecated sampler_index when sampler_name is given, ...): accepted and recorded.
    denoising_strength: Any = None
    firstphase_width: Any = None
    firstphase_height: Any = None
    hr_scale: Any = None
    hr_upscaler: Any = None
    hr_second_pass_steps: Any = None
    hr_resize_x: Any = None
    hr_resize_y: Any = None
    hr_checkpoint_name: Any = None
    hr_sampler_name: Any = None
    hr_scheduler: Any = None
    hr_prompt: Any = None
    hr_negative_prompt: Any = None
    hr_additional_modules: Any = None
    subseed: Any = None
    s_tmax: Any = None
    s_tmin: Any = None
    sampler_index: Any = None
    refiner_switch_at: Any = None
    do_not_save_samples: Any = None
    do_not_save_grid: Any = None
    override_settings_restore_afterwards: Any = None
    save_images: Any = None
    send_images: Annotated[bool, Field(description="false: answer with no images (they are stored anyway).")] = True
    disable_extra_networks: Any = None
    comments: Any = None
    force_task_id: Any = None
    infotext: Any = None


class Txt2ImgResponse(BaseModel):
    """A1111's answer: base64 PNGs, the request as received, and `info` as a JSON string; plus the manifest."""

    images: list[str] = Field(description="Base64 PNGs (no data: prefix) with `parameters` and the signed manifest.")
    parameters: dict[str, Any] = Field(description="The request body as received.")
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, ... and `sameseed` (id, hashes).")
    manifest: Manifest


class SdModel(BaseModel):
    """One entry of GET /sdapi/v1/sd-models."""

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class A1111Sampler(BaseModel):
    """One entry of GET /sdapi/v1/samplers."""

    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Scheduler(BaseModel):
    """One entry of GET /sdapi/v1/schedulers."""

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class ProgressState(BaseModel):
    """The `state` of GET /sdapi/v1/progress."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(BaseModel):
    """GET /sdapi/v1/progress: the oldest running job's fraction of steps done, its current image and step."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
