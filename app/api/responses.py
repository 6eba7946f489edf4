"""OpenAPI descriptions of the error responses every route may give."""

from __future__ import annotations

from typing import Any

from app.api.schemas import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    422: {"model": ErrorResponse, "description": "A parameter is invalid; `param` names it"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Not ready, model unavailable, or worker lost"},
    504: {"model": ErrorResponse, "description": "Deadline passed"},
}
