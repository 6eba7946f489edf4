"""Shared by the compatibility front doors: build Sameseed's request from a foreign one, and record the rest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from app.api.schemas import GenerationRequest
from app.errors import InvalidRequest, SameseedError
from app.provenance.manifest import ManifestWarning

FRONT_DOOR_CODE = "front_door"
_SHOWN_CHARS = 200  # a recorded value longer than this is cut: the manifest proves the image, not the payload


def generation_request(fields: Mapping[str, Any], names: Mapping[str, str]) -> GenerationRequest:
    """Validate `fields` as a GenerationRequest; InvalidRequest names the foreign field (`names` maps ours to it)."""
    try:
        return GenerationRequest.model_validate(dict(fields))
    except ValidationError as exc:
        error = exc.errors()[0]
        ours = str(error["loc"][0]) if error["loc"] else None
        param = names.get(ours, ours) if ours else None
        raise InvalidRequest(f"{param}: {error['msg']}", param=param) from None


def rename_param(error: SameseedError, names: Mapping[str, str]) -> SameseedError:
    """The same error naming the foreign field (e.g. `width` -> `size`) the client actually sent."""
    if error.param is None or error.param not in names:
        return error
    foreign = names[error.param]
    return type(error)(f"{foreign}: {error.message}", param=foreign)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def front_door_note(door: str, without_effect: Mapping[str, Any]) -> ManifestWarning:
    """The manifest note saying which API a request came through and what it sent that had no effect."""
    message = f"received through {door}"
    if without_effect:
        accepted = ", ".join(f"{name}={_shown(value)}" for name, value in sorted(without_effect.items()))
        message += f"; accepted without effect on the image: {accepted}"
    return ManifestWarning(code=FRONT_DOOR_CODE, message=message)
