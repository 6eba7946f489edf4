"""Domain exceptions and the one table that maps them to HTTP statuses and one error body."""

from __future__ import annotations

from typing import Any


class SameseedError(Exception):
    """Base of every error the API reports; carries a type, a message and the offending field."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers for this error."""
        return {}

    def body(self) -> dict[str, Any]:
        """The one error body shape: {"error": {"type", "message", "param"}}."""
        return error_body(self.type, self.message, self.param)


class InvalidRequest(SameseedError):
    """A parameter is out of range or inconsistent with the chosen model."""

    status, type = 422, "invalid_request"


class MalformedRequest(SameseedError):
    """The body is not valid JSON or not an object."""

    status, type = 400, "malformed_request"


class UnsupportedMediaType(SameseedError):
    """A JSON route got a body sent as another content type (form data, text, none)."""

    status, type = 415, "unsupported_media_type"


class RequestTimeout(SameseedError):
    """The client took too long to send its request's headers or body."""

    status, type = 408, "request_timeout"


class TooManyConnections(SameseedError):
    """The server holds as many client connections as it allows; retry shortly."""

    status, type = 503, "too_many_connections"

    def headers(self) -> dict[str, str]:
        """Retry in a second."""
        return {"Retry-After": "1"}


class ModelNotFound(SameseedError):
    """The request names a model the registry does not list."""

    status, type = 404, "model_not_found"


class NotFound(SameseedError):
    """No such route or resource."""

    status, type = 404, "not_found"


class MethodNotAllowed(SameseedError):
    """The route exists but not for this HTTP method."""

    status, type = 405, "method_not_allowed"


class Unauthorized(SameseedError):
    """API keys are on and the request has no valid `Authorization: Bearer <key>`."""

    status, type = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        """Tell the client which scheme to use."""
        return {"WWW-Authenticate": "Bearer"}


class GenerationNotFound(SameseedError):
    """The ledger has no generation with this id (or it has no image with this index)."""

    status, type = 404, "generation_not_found"


class ImageGone(SameseedError):
    """The generation is known but its image file was pruned by retention; the manifest stays."""

    status, type = 410, "image_gone"


class PayloadTooLarge(SameseedError):
    """The request body is larger than this route accepts."""

    status, type = 413, "payload_too_large"


class StorageUnavailable(SameseedError):
    """The image store or the ledger cannot be written (disk full, permissions)."""

    status, type = 503, "storage_unavailable"


class QueueFull(SameseedError):
    """The bounded queue is full; retry after the estimated wait."""

    status, type = 429, "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds."""
        return {"Retry-After": str(self.retry_after_s)}


class KeyUnavailable(SameseedError):
    """The request names a reproducibility key no worker of this server has."""

    status, type = 409, "key_unavailable"


class ClientDisconnected(SameseedError):
    """The client went away before its answer was ready (nginx's 499)."""

    status, type = 499, "client_disconnected"


class OutOfMemory(SameseedError):
    """The device ran out of memory for this image; the worker keeps serving."""

    status, type = 503, "out_of_memory"


class NotReady(SameseedError):
    """No worker can serve the request now (starting, restarting, failed or shutting down)."""

    status, type = 503, "not_ready"


class ModelUnavailable(SameseedError):
    """The model is registered but cannot be loaded (pinned hash mismatch, missing files, pickles)."""

    status, type = 503, "model_unavailable"


class WorkerLost(SameseedError):
    """The worker process died while generating and the retry failed too."""

    status, type = 503, "worker_lost"


class JobTimeout(SameseedError):
    """The job passed its deadline."""

    status, type = 504, "timeout"


class JobCanceled(SameseedError):
    """The job was canceled (POST /v1/generations/{id}/cancel) before it finished."""

    status, type = 409, "canceled"


class Interrupted(SameseedError):
    """The server stopped before an accepted job finished; the same request gives the same images."""

    status, type = 503, "interrupted"


class GenerationFailed(SameseedError):
    """The pipeline raised while generating; the worker keeps serving."""

    status, type = 500, "generation_failed"


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Build the one error body every error response uses."""
    return {"error": {"type": type_, "message": message, "param": param}}


ERRORS: tuple[type[SameseedError], ...] = (
    MalformedRequest,
    Unauthorized,
    ModelNotFound,
    NotFound,
    GenerationNotFound,
    MethodNotAllowed,
    RequestTimeout,
    KeyUnavailable,
    ImageGone,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidRequest,
    QueueFull,
    ClientDisconnected,
    JobCanceled,
    GenerationFailed,
    NotReady,
    Interrupted,
    ModelUnavailable,
    OutOfMemory,
    WorkerLost,
    StorageUnavailable,
    TooManyConnections,
    JobTimeout,
)
"""The one error table: each class names its status and type; handlers and OpenAPI both read it."""

ERROR_CLASSES: dict[str, type[SameseedError]] = {cls.type: cls for cls in ERRORS}

_FOR_HTTP_STATUS: dict[int, type[SameseedError]] = {
    400: MalformedRequest, 404: NotFound, 405: MethodNotAllowed, 408: RequestTimeout, 413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def for_http_status(status: int, message: str) -> SameseedError:
    """The domain error for a status the web framework raised itself (unknown route, wrong method, ...)."""
    cls = _FOR_HTTP_STATUS.get(status)
    if cls is None:
        error = SameseedError(message)
        error.status, error.type = status, "http_error"
        return error
    return cls(message)


def error_from_type(type_: str, message: str, param: str | None = None) -> SameseedError:
    """Rebuild a domain error from its type name (as sent by a worker); unknown types are internal."""
    cls = ERROR_CLASSES.get(type_)
    if cls is None or cls is QueueFull:
        return SameseedError(message, param=param)
    return cls(message, param=param)
