"""OpenAPI error responses, built from the one error table in app.errors."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from app.api.schemas import ErrorResponse
from app.errors import (
    ClientDisconnected,
    GenerationFailed,
    GenerationNotFound,
    ImageGone,
    InvalidRequest,
    JobTimeout,
    KeyUnavailable,
    MalformedRequest,
    ModelNotFound,
    ModelUnavailable,
    NotReady,
    OutOfMemory,
    PayloadTooLarge,
    QueueFull,
    SameseedError,
    StorageUnavailable,
    WorkerLost,
)


def error_responses(*errors: type[SameseedError]) -> dict[int | str, dict[str, Any]]:
    """One OpenAPI response per status these errors use, listing each error `type` and what it means."""
    by_status: dict[int, list[str]] = defaultdict(list)
    for cls in errors:
        summary = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        by_status[cls.status].append(f"`{cls.type}`: {summary}")
    return {
        status: {"model": ErrorResponse, "description": "; ".join(lines)} for status, lines in sorted(by_status.items())
    }


WORK_ERRORS = (
    MalformedRequest, InvalidRequest, ModelNotFound, PayloadTooLarge, QueueFull, ClientDisconnected,
    NotReady, ModelUnavailable, OutOfMemory, WorkerLost, JobTimeout, GenerationFailed,
)
ERROR_RESPONSES = error_responses(*WORK_ERRORS)
GENERATION_ERRORS = error_responses(*WORK_ERRORS, KeyUnavailable, StorageUnavailable)
LEDGER_ERRORS = error_responses(GenerationNotFound, ImageGone, InvalidRequest, StorageUnavailable)
JOB_ERRORS = error_responses(GenerationNotFound, InvalidRequest, StorageUnavailable)
