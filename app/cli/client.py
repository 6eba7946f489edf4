"""A small HTTP client for a running Sameseed server (used by the CLI)."""

from __future__ import annotations

import os
from typing import Any

import httpx


class RemoteError(RuntimeError):
    """The server answered with an error body (or not at all)."""


class SameseedClient:
    """Calls a Sameseed server's API; the API key comes from the argument or SAMESEED_API_KEY."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 900.0) -> None:
        key = api_key or os.environ.get("SAMESEED_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the JSON body, or raise RemoteError with the server's message."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"{method} {self.http.base_url}{path}: {exc}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                detail = f"{error['type']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            raise RemoteError(f"{method} {path} answered {response.status_code}: {detail}")
        return response.json()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()
