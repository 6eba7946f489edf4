"""GET /docs with Swagger UI served from this server (the pinned swagger-ui-py package), not from a CDN.

FastAPI's own /docs page loads its script and stylesheet from a CDN and /redoc does the same: neither
renders on a server without internet access. Here /docs serves the files the swagger-ui-py wheel ships
(Swagger UI 5, which renders OpenAPI 3.1), and /redoc is left out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def swagger_ui_folder() -> Path:
    """The folder of Swagger UI's dist files inside the installed swagger-ui-py package (not imported)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (requirements.lock pins it)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def install_offline_docs(app: FastAPI, path: str = "/docs") -> None:
    """Replace FastAPI's CDN-backed /docs (and /redoc) with a page whose assets this server serves."""
    folder = swagger_ui_folder()
    missing = [name for name in ASSET_TYPES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"swagger-ui-py lacks {missing} in {folder}")
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in (path, "/redoc")]

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{path}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{path}/swagger-ui.css",
            swagger_favicon_url=f"{root}{path}/favicon-32x32.png",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
        )

    app.add_api_route(path, docs, methods=["GET"], include_in_schema=False)
    for name, media_type in ASSET_TYPES.items():
        app.add_api_route(f"{path}/{name}", _asset(folder / name, media_type), methods=["GET"], include_in_schema=False)


def _asset(file: Path, media_type: str):  # noqa: ANN202 - an endpoint without parameters
    async def asset() -> FileResponse:
        # the files of one pinned package version: clients may keep them for a day
        return FileResponse(file, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})

    return asset
