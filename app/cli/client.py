"""A small typed HTTP client for a running Sameseed server (the CLI uses it; needs httpx and pydantic, not torch)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.api.schemas import GenerationRequest, GenerationResponse, HealthResponse, ReadyResponse

RETRIED_STATUSES = frozenset({429, 503})  # queue full, not ready (starting, restarting, draining)
MAX_RETRY_AFTER_S = 120.0


class RemoteError(RuntimeError):
    """The server answered with an error body (or not at all); `status` is None when it did not answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SameseedClient:
    """Calls a Sameseed server's API; the API key comes from the argument or SAMESEED_API_KEY.

    429 and 503 answers are retried up to `retries` times, after the server's Retry-After when it sends
    one (at most 120 s), else after 1, 2, 4, ... seconds.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = api_key or os.environ.get("SAMESEED_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)
        self.retries = retries
        self.sleep = sleep

    def __enter__(self) -> SameseedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_s(self, response: httpx.Response, attempt: int) -> float:
        given = response.headers.get("retry-after", "")
        try:
            return min(max(float(given), 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            return float(2**attempt)

    def request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """Send one request (retrying 429/503 when `retry`); the response, whatever its status."""
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise RemoteError(f"{method} {self.http.base_url}{path}: {exc}") from exc
            if not retry or response.status_code not in RETRIED_STATUSES or attempt >= self.retries:
                return response
            self.sleep(self._wait_s(response, attempt))
            attempt += 1

    def call(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Any:
        """Send one request; return the JSON body, or raise RemoteError with the server's message."""
        response = self.request(method, path, retry=retry, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                detail = f"{error['type']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            raise RemoteError(f"{method} {path} answered {response.status_code}: {detail}", response.status_code)
        return response.json()

    def generate(self, request: GenerationRequest) -> GenerationResponse:
        """POST /v1/generations: the images, their hashes and the signed manifest."""
        body = request.model_dump(mode="json", exclude_none=True)
        return GenerationResponse.model_validate(self.call("POST", "/v1/generations", json=body))

    def health(self) -> HealthResponse:
        """GET /healthz: the process is alive (never retried)."""
        return HealthResponse.model_validate(self.call("GET", "/healthz", retry=False))

    def ready(self) -> ReadyResponse:
        """GET /readyz, 200 or 503 alike (never retried): whether a worker serves, and every worker's state."""
        response = self.request("GET", "/readyz", retry=False)
        if response.status_code not in (200, 503):
            status = response.status_code
            raise RemoteError(f"GET /readyz answered {status}: {response.text[:500]}", status)
        return ReadyResponse.model_validate(response.json())

    def public_keys(self) -> dict[str, Any]:
        """GET /v1/keys: the server's manifest signing public keys."""
        return self.call("GET", "/v1/keys")

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()
