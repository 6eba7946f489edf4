"""The OpenAPI document: stable operation ids, the bearer scheme, PNG bodies described."""

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.support.fakes import answering_app

OPERATION_IDS = {
    "create_generation",
    "cancel_generation",
    "generation_events",
    "list_generations",
    "get_generation",
    "get_generation_image",
    "reproduce_generation",
    "verify_provenance",
    "list_public_keys",
    "get_health",
    "get_readiness",
    "get_metrics",
    "list_models",
    "list_samplers",
    "get_consistency",
    "run_consistency_checks",
    "export_baselines",
    "import_baselines",
    "create_openai_image",
    "a1111_txt2img",
    "a1111_list_models",
    "a1111_list_samplers",
    "a1111_list_schedulers",
    "a1111_get_options",
    "a1111_list_scripts",
    "a1111_progress",
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), workers="cpu:1")
    application = answering_app(settings)
    with TestClient(application) as client:
        yield client.get("/openapi.json").json()


def operations(spec):
    return {op["operationId"]: (path, op) for path, ops in spec["paths"].items() for op in ops.values()}


def test_operation_ids_are_the_stable_short_names(spec):
    assert set(operations(spec)) == OPERATION_IDS


def test_the_bearer_scheme_is_declared_on_every_route_but_health_and_metrics(spec):
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for name, (path, op) in operations(spec).items():
        open_route = path in ("/healthz", "/readyz", "/metrics")
        assert ("security" not in op) is open_route, name
        if not open_route:
            assert {"bearer": []} in op["security"]


def test_png_bodies_are_described(spec):
    ops = operations(spec)
    assert "image/png" in ops["get_generation_image"][1]["responses"]["200"]["content"]
    for name in ("verify_provenance", "reproduce_generation"):
        content = ops[name][1]["requestBody"]["content"]
        assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
