"""/docs renders from this server's own files: no CDN in the page, every asset it names is served here."""

import re

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.support.fakes import FakePool


def test_docs_page_names_only_assets_this_server_serves(tmp_path):
    application = create_app(
        Settings(data_dir=tmp_path, workers="cpu:1"),
        pool_factory=lambda *args: FakePool(*args, auto=True),
    )
    with TestClient(application) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?['"]([^'"]+)['"]""", page.text)
        urls = [a or b for a, b in urls]
        assert not [u for u in urls if "//" in u], urls  # nothing from another host (FastAPI's default: a CDN)
        assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/openapi.json"} <= set(urls)
        bundle = client.get("/docs/swagger-ui-bundle.js")
        assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert client.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
        assert client.get("/docs/favicon-32x32.png").content.startswith(b"\x89PNG")
        # Swagger UI 5 renders the OpenAPI 3.1 document FastAPI writes (Swagger UI 4 refuses it)
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
        assert re.search(r'"5\.\d+\.\d+"', bundle.text)
        assert client.get("/redoc").status_code == 404  # ReDoc needs a CDN: not offered
        assert client.get("/docs/swagger-ui-bundle.js", params={"name": "../../settings.py"}).text == bundle.text
