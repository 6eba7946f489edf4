"""A server whose model comes from a (fake, local) hub: not ready with a reason, pull at start, offline restart."""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.conftest import ROOT
from tests.support.fake_hub import COMMIT, REPO, hub_registry, tiny_hub, tiny_pins


def healthcheck(port: int) -> int:
    """Run the image's HEALTHCHECK command (from the Dockerfile) against a local server; its exit code."""
    dockerfile = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    command = json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", dockerfile, flags=re.MULTILINE).group(1))
    assert command[0] == "python"
    env = {**os.environ, "SAMESEED_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def wait_for_worker_error(url: str, deadline_s: float = 120.0) -> dict:
    """Poll /readyz until a worker reports why it cannot start; returns the body."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2.0)
            body = response.json()
            if any(worker.get("last_error") for worker in body["workers"]):
                assert response.status_code == 503
                return body
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no worker reported an error within {deadline_s}s")


@pytest.fixture()
def fake_hub():
    with tiny_hub() as server:
        yield server


def test_hub_model_not_ready_then_pulled_at_start_then_served_offline_with_the_same_bits(
    fake_hub, make_server, server, tmp_path
):
    env = {
        "SAMESEED_MODELS": str(hub_registry(tmp_path, pins=False)),  # pinned on first pull only
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }

    # 1. A cold cache with downloads off: not ready, with a reason that says what to do; unhealthy.
    cold = make_server("cold", **env, SAMESEED_ALLOW_DOWNLOAD="false").start(wait_ready=False)
    body = wait_for_worker_error(cold.url)
    reason = body["workers"][0]["last_error"]
    assert "model_unavailable" in reason and "python -m app models pull tiny-hub" in reason, reason
    assert healthcheck(cold.port) == 1
    assert fake_hub.requests == []
    cold.stop()

    # 2. Downloads on: the worker pulls the model at start, verifies and pins it; healthy.
    pulling = make_server("data", **env, SAMESEED_ALLOW_DOWNLOAD="true").start()
    assert len(fake_hub.downloads()) == len(tiny_pins())
    pins = json.loads((tmp_path / "data" / "hub-pins.json").read_text())
    assert pins["repos"] == {f"{REPO}@{COMMIT}": tiny_pins()}
    assert healthcheck(pulling.port) == 0
    pulling.stop()

    # 3. The hub gone and offline mode on: the warm cache starts, from inside an "image".
    fake_hub.stop()
    image = {"SAMESEED_IMAGE_VERSION": "9.9.9", "SAMESEED_IMAGE_REVISION": "abc123", "SAMESEED_IMAGE_BASE": "cuda:x"}
    offline = make_server("data", **env, HF_HUB_OFFLINE="1", **image).start()
    hub_body = offline.generate(seed=5, model="tiny-hub")
    local_body = server.generate(seed=5, model="sameseed-tiny")  # the embedded copy of the same bytes

    manifest, local = hub_body["manifest"], local_body["manifest"]
    assert manifest["model"]["source_kind"] == "hub"
    assert (manifest["model"]["hub_repo"], manifest["model"]["hub_revision"]) == (REPO, COMMIT)
    assert manifest["model"]["source"] == str(tmp_path / "data" / "hub" / "tiny-hub" / "model")
    assert manifest["model"]["files"] == local["model"]["files"] == tiny_pins()
    assert manifest["runtime"]["image"] == {"version": "9.9.9", "revision": "abc123", "base": "cuda:x"}
    assert local["runtime"].get("image") is None
    # the image is provenance, not part of the key: same key, same bits as the embedded model
    assert manifest["runtime"]["reproducibility_key"] == local["runtime"]["reproducibility_key"]
    assert [(i["latent_sha256"], i["pixel_sha256"]) for i in hub_body["images"]] == [
        (i["latent_sha256"], i["pixel_sha256"]) for i in local_body["images"]
    ]
