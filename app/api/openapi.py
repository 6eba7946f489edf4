"""The OpenAPI document: stable operation ids and the bearer scheme, so generated clients read well."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.api.auth import OPEN_PATHS

# Route function name -> operation id, where the function's name does not say what it does to a client.
RENAMED = {
    "healthz": "get_health",
    "readyz": "get_readiness",
    "metrics": "get_metrics",
    "get_image": "get_generation_image",
    "verify": "verify_provenance",
    "list_keys": "list_public_keys",
    "consistency": "get_consistency",
    "run_checks": "run_consistency_checks",
    "replay": "reproduce_generation",
}
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key, required when the server has SAMESEED_API_KEYS_FILE; health and metrics are open.",
}


def operation_id(route: APIRoute) -> str:
    """The operation id of a route: its function's name (or RENAMED's), never FastAPI's path-derived name."""
    return RENAMED.get(route.name, route.name)


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document declaring the bearer scheme on every route that can require a key."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            spec.setdefault("components", {})["securitySchemes"] = {"bearer": BEARER}
            for path, operations in spec["paths"].items():
                for operation in operations.values():
                    if path not in OPEN_PATHS:
                        operation["security"] = [{"bearer": []}, {}]  # {}: servers without keys files
                    # FastAPI's default 422 body is never what this server sends: routes declare their own
                    # (the OpenAI route answers 400 instead), so a generated client gets no false model.
                    if _FASTAPI_422 in json.dumps(operation.get("responses", {}).get("422", {})):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                spec["components"].get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
