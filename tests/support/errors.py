"""The one error body, asserted: every error answer has exactly {"error": {"type", "message", "param"}}."""

from __future__ import annotations

from typing import Any


def assert_error(response: Any, status: int, type_: str, param: str | None = None) -> str:  # noqa: ANN401
    """Assert the status and the one error body with this type and param; return its (non-empty) message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    assert body["error"]["type"] == type_ and body["error"]["param"] == param
    assert body["error"]["message"]
    return body["error"]["message"]
