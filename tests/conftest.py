"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Test processes run side by side (pytest-xdist), so a torch import in one of them gets one thread, as each
# worker of a test server does: two processes spinning two threads each on two cores wait on each other.
# Set before any test module imports torch; tests that must match a manifest set its thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

from app.models.registry import Registry, load_registry
from app.settings import EMBEDDED_REGISTRY
from tests.support.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures for every layer
from tests.support.servers import Server


@pytest.fixture(scope="session", autouse=True)
def kept_cobatch_proofs(tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """Every server the tests start keeps its co-batching proofs in one folder for the whole run (all xdist
    processes): the first start under a key proves, the others take its verdicts, as a restart would."""
    base = tmp_path_factory.getbasetemp()
    folder = (base if worker_id == "master" else base.parent) / "cobatch-proofs"
    before = os.environ.get("SAMESEED_BATCH_PROOF_DIR")
    os.environ["SAMESEED_BATCH_PROOF_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SAMESEED_BATCH_PROOF_DIR", None)
    else:
        os.environ["SAMESEED_BATCH_PROOF_DIR"] = before


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real server per test process (cpu:1, one thread, the embedded tiny model), shared by every layer that
    needs a plain one: the end-to-end tests and the Ray tests' standalone reference."""
    srv = Server(tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(EMBEDDED_REGISTRY)


@pytest.fixture()
def registry_file(tmp_path: Path):
    """Write a registry YAML into tmp_path and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "registry.yaml"
        path.write_text(text)
        return path

    return write


LAYERS = ("unit", "integration", "e2e", "ray")


# The order modules are handed to xdist processes: slowest layers first, so the many short unit modules
# fill the processes' gaps at the end instead of a 100 s module starting last.
RUN_ORDER = ("ray", "e2e", "integration", "unit")


def _layer(item: pytest.Item) -> str | None:
    return next((part for part in item.path.parts if part in LAYERS), None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by its folder (`pytest -m unit` runs the fast layer alone, `-m "not ray"` skips Ray) and
    run the layers slowest first (a stable sort: within a layer, the usual order)."""
    for item in items:
        layer = _layer(item)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))
    rank = {layer: k for k, layer in enumerate(RUN_ORDER)}
    items.sort(key=lambda item: rank.get(_layer(item) or "", len(RUN_ORDER)))
