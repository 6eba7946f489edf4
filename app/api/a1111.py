"""The AUTOMATIC1111 API (/sdapi/v1/...): txt2img and what A1111 clients read around it, on the one generation path.

Errors keep Sameseed's one error body; a feature Sameseed does not have is a 422 naming the field.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request

from app.api.a1111_schemas import (
    UNSUPPORTED_FEATURES,
    A1111Sampler,
    A1111Scheduler,
    Progress,
    ProgressState,
    SdModel,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from app.api.deps import GenerationDep
from app.api.responses import ERROR_RESPONSES
from app.api.schemas import MAX_IMAGES, GenerationRequest
from app.api.translation import front_door_note, generation_request, rename_param
from app.errors import InvalidRequest, SameseedError
from app.models.registry import ModelEntry
from app.provenance.manifest import Manifest, ManifestWarning
from app.provenance.png import A1111_SAMPLER_NAMES, a1111_parameters, model_hash

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

DOOR = "the AUTOMATIC1111 API (POST /sdapi/v1/txt2img)"
PARAM_NAMES = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "sampler": "sampler_name",
    "model": "override_settings.sd_model_checkpoint",
}
# A1111 sampler names and their aliases -> Sameseed's sampler (Sameseed's own names are accepted too).
SAMPLER_ALIASES: dict[str, list[str]] = {
    "euler_a": ["k_euler_a", "k_euler_ancestral"],
    "euler": ["k_euler"],
    "lms": ["k_lms"],
    "heun": ["k_heun"],
    "dpmpp_2m": ["k_dpmpp_2m"],
    "dpmpp_2m_karras": ["k_dpmpp_2m_ka"],
    "ddim": [],
    "pndm": ["plms"],
    "unipc": [],
}
SAMPLERS_BY_NAME: dict[str, str] = {
    alias.lower(): ours
    for ours, aliases in SAMPLER_ALIASES.items()
    for alias in (A1111_SAMPLER_NAMES[ours], ours, *aliases)
}
AUTOMATIC = frozenset({"", "automatic"})
# eta as the sampler runs it: A1111's `eta` must agree where the sampler uses one.
SAMPLER_ETA = {"euler_a": 1.0, "ddim": 0.0}
# The override_settings Sameseed honours or whose value is what it does anyway.
NEUTRAL_SETTINGS = {"CLIP_stop_at_last_layers": 1}
TRANSLATED = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "sampler_name",
        "scheduler",
        "batch_size",
        "n_iter",
        "override_settings",
    }
)
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


def _sampler(body: Txt2ImgRequest) -> str | None:
    if body.sampler_name is None or body.sampler_name.strip() == "":
        sampler = None
    else:
        sampler = SAMPLERS_BY_NAME.get(body.sampler_name.strip().lower())
        if sampler is None:
            known = ", ".join(A1111_SAMPLER_NAMES.values())
            message = f"sampler_name {body.sampler_name!r} is not served; use one of {known}"
            raise InvalidRequest(message, param="sampler_name")
    scheduler = (body.scheduler or "").strip().lower()
    if scheduler == "karras" and sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
        return "dpmpp_2m_karras"
    if scheduler not in AUTOMATIC:
        raise InvalidRequest(
            f"scheduler {body.scheduler!r} is not served with this sampler: use Automatic (the sampler as named), "
            "or Karras with DPM++ 2M",
            param="scheduler",
        )
    return sampler


def _model(body: Txt2ImgRequest) -> tuple[str | None, dict[str, Any]]:
    settings = dict(body.override_settings or {})
    checkpoint = settings.pop("sd_model_checkpoint", None)
    for name, value in settings.items():
        if name not in NEUTRAL_SETTINGS or value != NEUTRAL_SETTINGS[name]:
            raise InvalidRequest(
                f"override_settings.{name}={value!r} is not supported; only sd_model_checkpoint is honoured",
                param=f"override_settings.{name}",
            )
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise InvalidRequest("override_settings.sd_model_checkpoint must be a model id", param=PARAM_NAMES["model"])
    return (_TITLE_HASH.sub("", checkpoint) if checkpoint else None), settings


def to_generation_request(body: Txt2ImgRequest) -> tuple[GenerationRequest, ManifestWarning]:
    """Sameseed's request for an A1111 txt2img one (422 naming any feature it lacks), and the note of the rest."""
    for name, (off, feature) in UNSUPPORTED_FEATURES.items():
        value = getattr(body, name)
        if value is not None and value not in off:
            raise InvalidRequest(f"{name}={value!r}: Sameseed has no {feature}", param=name)
    if body.batch_size * body.n_iter > MAX_IMAGES:
        raise InvalidRequest(
            f"batch_size * n_iter must be at most {MAX_IMAGES}; got {body.batch_size} * {body.n_iter}",
            param="batch_size",
        )
    sampler = _sampler(body)
    model, neutral_settings = _model(body)
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "model": model,
        "seed": None if body.seed == -1 else body.seed,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "sampler": sampler,
        "num_images": body.batch_size * body.n_iter,
    }
    request = generation_request({k: v for k, v in fields.items() if v is not None}, PARAM_NAMES)
    without_effect = {name: getattr(body, name) for name in body.model_fields_set - TRANSLATED}
    without_effect.update({f"override_settings.{k}": v for k, v in neutral_settings.items()})
    return request, front_door_note(DOOR, without_effect)


def _check_eta(body: Txt2ImgRequest, sampler: str) -> None:
    # Known only once the model's default sampler is filled in, i.e. from the manifest.
    expected = SAMPLER_ETA.get(sampler)
    if body.eta is not None and expected is not None and body.eta != expected:
        name = A1111_SAMPLER_NAMES[sampler]
        raise InvalidRequest(f"eta={body.eta:g}: Sameseed's {name} runs with eta {expected:g}", param="eta")


def infotext_info(body: Txt2ImgRequest, manifest: Manifest) -> dict[str, Any]:
    """The `info` object A1111 answers (as a dict; it is sent as a JSON string), with Sameseed's hashes."""
    request = manifest.request
    document = manifest.model_dump(mode="json")
    seeds = [image.seed for image in manifest.images]
    count = len(seeds)
    finished = datetime.fromisoformat(manifest.timestamps.finished.replace("Z", "+00:00")).astimezone(UTC)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": seeds[0],
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": A1111_SAMPLER_NAMES.get(request.sampler, request.sampler),
        "scheduler": "Automatic",
        "cfg_scale": request.guidance_scale,
        "steps": request.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": manifest.model.id,
        "sd_model_hash": model_hash(manifest.model.files),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(document, image.index) for image in manifest.images],
        "styles": [],
        "job_timestamp": finished.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"sameseed {manifest.service['version']}",
        "sameseed": {
            "id": manifest.id,
            "reproducibility_key": manifest.runtime.reproducibility_key,
            "images": [
                {
                    "index": image.index,
                    "seed": image.seed,
                    "latent_sha256": image.latent_sha256,
                    "pixel_sha256": image.pixel_sha256,
                }
                for image in manifest.images
            ],
        },
    }


@router.post("/txt2img", response_model=Txt2ImgResponse, responses=ERROR_RESPONSES, operation_id="a1111_txt2img")
async def txt2img(
    body: Txt2ImgRequest, generations: GenerationDep, http_request: Request
) -> Txt2ImgResponse:
    """A1111's txt2img: images seed + k, `info` as A1111 clients parse it, the same hashes as POST /v1/generations."""
    request, note = to_generation_request(body)
    if body.eta is not None:  # the model's default sampler decides whether eta matters
        entry = generations.registry.get(request.model or generations.default_model)
        if entry is not None:
            _check_eta(body, request.sampler or entry.defaults.sampler)
    try:
        archived = await generations.create(
            generations.resolve(**request.param_fields()),
            reproducibility_key=request.reproducibility_key,
            disconnected=http_request.is_disconnected,
            notes=[note],
        )
    except SameseedError as exc:  # the model's limits name Sameseed's fields: name the client's
        raise rename_param(exc, PARAM_NAMES) from None
    return Txt2ImgResponse(
        images=[base64.b64encode(png).decode("ascii") for png in archived.pngs] if body.send_images else [],
        parameters=body.model_dump(mode="json", exclude_unset=True),
        info=json.dumps(infotext_info(body, archived.manifest)),
        manifest=archived.manifest,
    )


def _title(entry: ModelEntry) -> tuple[str, str | None]:
    short = model_hash(entry.sha256) if entry.sha256 else None
    return (f"{entry.id} [{short}]" if short else entry.id), short


@router.get("/sd-models", response_model=list[SdModel], operation_id="a1111_list_models")
async def sd_models(generations: GenerationDep) -> list[SdModel]:
    """Every registered model; its `title` or `model_name` goes in override_settings.sd_model_checkpoint."""
    models = []
    for entry in generations.registry.models:
        title, short = _title(entry)
        models.append(SdModel(title=title, model_name=entry.id, hash=short, sha256=None, filename=entry.id))
    return models


@router.get("/samplers", response_model=list[A1111Sampler], operation_id="a1111_list_samplers")
async def samplers() -> list[A1111Sampler]:
    """Sameseed's samplers under A1111's names, with A1111's aliases and Sameseed's own name."""
    return [
        A1111Sampler(name=A1111_SAMPLER_NAMES[ours], aliases=[ours, *aliases], options={})
        for ours, aliases in SAMPLER_ALIASES.items()
    ]


@router.get("/schedulers", response_model=list[A1111Scheduler], operation_id="a1111_list_schedulers")
async def schedulers() -> list[A1111Scheduler]:
    """The schedules a txt2img request may name: Automatic (the sampler as named), Karras (with DPM++ 2M)."""
    return [
        A1111Scheduler(name="automatic", label="Automatic"),
        A1111Scheduler(name="karras", label="Karras", default_rho=7.0),
    ]


@router.get("/options", operation_id="a1111_get_options")
async def options(generations: GenerationDep) -> dict[str, Any]:
    """The A1111 options that describe what Sameseed does (read-only: Sameseed has no global settings)."""
    entry = generations.registry.get(generations.default_model)
    title, short = _title(entry) if entry is not None else (generations.default_model, None)
    return {
        "sd_model_checkpoint": title,
        "sd_checkpoint_hash": short,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_ddim": SAMPLER_ETA["ddim"],
        "eta_ancestral": SAMPLER_ETA["euler_a"],
        "s_churn": 0.0,
        "s_noise": 1.0,
        "sd_vae": "Automatic",
    }


@router.get("/scripts", operation_id="a1111_list_scripts")
async def scripts() -> dict[str, list[str]]:
    """No scripts: A1111 clients probe this for extensions."""
    return {"txt2img": [], "img2img": []}


@router.get("/progress", response_model=Progress, operation_id="a1111_progress")
async def progress(generations: GenerationDep) -> Progress:
    """A1111's progress poll: the oldest running job's steps done, from the same state job events report."""
    running = generations.running_progress()
    if running is None:
        return Progress(progress=0.0, eta_relative=0.0, state=ProgressState(job_count=0))
    eta = running.elapsed_s * (1 - running.fraction) / running.fraction if running.fraction > 0 else 0.0
    return Progress(
        progress=round(running.fraction, 4),
        eta_relative=round(eta, 2),
        state=ProgressState(
            job=running.job_id,
            job_count=running.jobs,
            job_no=running.image_index,
            sampling_step=running.step,
            sampling_steps=running.steps,
        ),
    )
