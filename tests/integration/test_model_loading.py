"""Loading real pipelines: the committed tiny model with plain diffusers, and a hub model from its pulled folder."""

import numpy as np
import pytest
import torch

from app.models.build import MODEL_SPECS
from app.models.hub import pull
from app.models.registry import load_registry
from tests.support.fake_hub import COMMIT, REPO, TINY, hub_registry, tiny_hub, tiny_pins


@pytest.fixture()
def fake_hub():
    with tiny_hub() as server:
        yield server


@pytest.fixture()
def dirs(tmp_path):
    return {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "hf-cache"}


def test_tiny_pipeline_loads_and_generates_finite_output():
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    spec = MODEL_SPECS["sameseed-tiny"]
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == spec.vae_scale_factor == 2
    text_cfg = pipe.text_encoder.config
    assert (text_cfg.bos_token_id, text_cfg.eos_token_id, text_cfg.pad_token_id) == (998, 999, 999)
    assert text_cfg.vocab_size == len(pipe.tokenizer) == 1000

    def run(output_type):
        return pipe(
            "a photo of a cat",
            num_inference_steps=20,
            guidance_scale=7.5,
            height=spec.default_size,
            width=spec.default_size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type=output_type,
        ).images

    latents = run("latent")
    assert tuple(latents.shape) == (1, 4, 32, 32)
    assert torch.isfinite(latents).all()
    image = run("np")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(np.unique((image * 255).round())) > 16  # not a flat or saturated image


def test_a_hub_model_resolves_and_loads_from_its_linked_folder(fake_hub, dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from app.pipeline.loader import load_model, resolve_paths

    registry = load_registry(hub_registry(tmp_path))
    entry = registry.get("tiny-hub")
    pull(entry, allow_download=True, endpoint=fake_hub.url, **dirs)
    # the worker's path: the default cache (HF_HOME) and no endpoint; offline mode proves no request is made
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(dirs["cache_dir"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    paths = resolve_paths(entry, registry, dirs["data_dir"], allow_download=False)
    loaded = load_model(entry, paths, "cpu")

    identity = loaded.identity()
    assert identity["source"] == str(dirs["data_dir"] / "hub" / "tiny-hub" / "model")
    assert (identity["source_kind"], identity["hub_repo"], identity["hub_revision"]) == ("hub", REPO, COMMIT)
    assert identity["files"] == tiny_pins()  # the same identity as the embedded model: same bytes, same key


COLD_START = """
import sys
from pathlib import Path
from app.worker.messages import WorkerConfig
from app.worker.process import start_engine
config = WorkerConfig(worker_id="w0", device="cpu", cpu_threads=1, cpu_mkldnn=True, registry_path=Path(sys.argv[1]),
                      data_dir=Path(sys.argv[2]), preload=("tiny-hub",), allow_download=False)
engine, answer = start_engine(config)
print(engine, answer.error_type, "torch" in sys.modules)
print(answer.message)
"""


def test_a_hub_model_missing_from_the_cache_fails_the_worker_start_before_torch_is_imported(tmp_path):
    """Downloads off and a cold cache: the worker's start answers why at once, without seconds of imports."""
    import os
    import subprocess
    import sys

    from tests.support.servers import ROOT

    registry = hub_registry(tmp_path)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", COLD_START, str(registry), str(tmp_path / "data")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.splitlines()
    assert status == "None model_unavailable False"
    assert "python -m app models pull tiny-hub" in message and "SAMESEED_ALLOW_DOWNLOAD is off" in message
