"""What the routes accept, read from the routes themselves: methods of a path, fields of a body or query."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route serves at this scope's path, sorted (for a 405's Allow header)."""
    # Asked method by method: included routers nest their routes, and each answers FULL only for its own
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def _model_fields(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [field.alias or name for name, field in annotation.model_fields.items()]
    return []


def accepted_fields(route: Any, location: str) -> list[str]:
    """The field names a route's body model (location `body`) or query parameters (`query`) accept."""
    if route is None:
        return []
    if location == "body":
        field = getattr(route, "body_field", None)
        info = getattr(field, "field_info", None)
        names = _model_fields(getattr(info, "annotation", None))
        return names or ([getattr(field, "alias", "")] if field is not None else [])
    if location == "query":
        dependant = getattr(route, "dependant", None)
        names: list[str] = []
        for param in getattr(dependant, "query_params", []):
            names.extend(_model_fields(getattr(param.field_info, "annotation", None)) or [param.alias])
        return names
    return []


def unknown_field_message(name: str, accepted: Sequence[str]) -> str:
    """`unknown field 'x'`, the closest accepted name when one is close, and the accepted names."""
    message = f"unknown field {name!r}"
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.75)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if accepted:
        message += f" Accepted fields: {', '.join(accepted)}"
    else:
        message += "; see the API docs for the accepted fields"
    return message
