"""Hub model acquisition against a local fake of the hub: selection, verification, pins, offline starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.errors import ModelUnavailable
from app.models import hub
from app.models.hub import DIFFUSERS_PATTERNS, PINS_FILE, HubFetch, fetch, plan, pull, read_pins
from app.models.registry import Registry, load_registry
from app.pipeline.loader import VAE_FILES
from app.provenance.hashes import file_sha256
from app.settings import EMBEDDED_REGISTRY
from tests.support.fake_hub import COMMIT, REPO, TINY, FakeHub, hub_registry, tiny_hub, tiny_pins

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {  # what a real SD1.5 repo holds besides the pipeline's files: none of it may be fetched
    "README.md": b"# tiny\n",
    "unet/diffusion_pytorch_model.bin": b"pickled weights",
    "unet/diffusion_pytorch_model.fp16.safetensors": b"a variant",
    "unet/diffusion_pytorch_model.non_ema.safetensors": b"another variant",
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"checker",
    "feature_extractor/preprocessor_config.json": b"{}",
    "v1-5-pruned-emaonly.safetensors": b"single file",
    "v1-5-pruned-emaonly.ckpt": b"pickled single file",
}


@pytest.fixture()
def fake_hub():
    with tiny_hub(EXTRAS) as server:
        yield server


@pytest.fixture()
def dirs(tmp_path):
    return {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "hf-cache"}


def tiny_fetch(revision: str = COMMIT) -> HubFetch:
    return HubFetch("model", REPO, revision, DIFFUSERS_PATTERNS)


def test_pull_fetches_only_the_pipeline_files_and_pins_their_sha256(fake_hub, dirs):
    snapshot = fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)

    assert snapshot.downloaded
    assert snapshot.files == tiny_pins()  # exactly the 12 files, with the bytes the hub lists
    assert sorted(fake_hub.downloads()) == sorted(f"/{REPO}/resolve/{COMMIT}/{rel}" for rel in tiny_pins())
    # the model folder holds links to exactly those files, whatever else the HF cache has
    linked = sorted(p.relative_to(snapshot.folder).as_posix() for p in snapshot.folder.rglob("*") if p.is_file())
    assert linked == sorted(tiny_pins())
    assert snapshot.folder == dirs["data_dir"] / "hub" / "tiny" / "model"
    assert file_sha256(snapshot.folder / "unet/diffusion_pytorch_model.safetensors") == file_sha256(
        TINY / "unet/diffusion_pytorch_model.safetensors"
    )
    assert read_pins(dirs["data_dir"]) == {f"{REPO}@{COMMIT}": tiny_pins()}


def test_a_warm_cache_starts_offline_without_a_single_request(fake_hub, dirs):
    fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)
    fake_hub.stop()  # the hub is gone: nothing may need it now
    seen = len(fake_hub.requests)

    for allow_download in (False, True):
        snapshot = fetch(tiny_fetch(), model_id="tiny", allow_download=allow_download, endpoint=fake_hub.url, **dirs)
        assert not snapshot.downloaded and snapshot.files == tiny_pins()
    assert len(fake_hub.requests) == seen


def test_a_cold_cache_without_downloads_says_how_to_pull(fake_hub, dirs):
    with pytest.raises(ModelUnavailable) as caught:
        fetch(tiny_fetch(), model_id="tiny", allow_download=False, endpoint=fake_hub.url, **dirs)
    message = caught.value.message
    assert "SAMESEED_ALLOW_DOWNLOAD is off" in message and "python -m app models pull tiny" in message
    assert REPO in message and fake_hub.requests == []


def test_bytes_other_than_the_hub_lists_are_refused_and_not_pinned(fake_hub, dirs):
    weights = "unet/diffusion_pytorch_model.safetensors"
    listed = fake_hub.repos[(REPO, COMMIT)][weights]
    fake_hub.served[(REPO, weights)] = bytes(b ^ 0xFF for b in listed[:64]) + listed[64:]  # same size

    with pytest.raises(ModelUnavailable) as caught:
        fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)
    assert weights in caught.value.message and "the hub declared" in caught.value.message
    assert read_pins(dirs["data_dir"]) == {}
    assert not (dirs["data_dir"] / "hub" / "tiny").exists()


def test_a_cached_file_changed_after_the_first_pull_breaks_its_pin(fake_hub, dirs):
    snapshot = fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)
    blob = (snapshot.folder / "vae/diffusion_pytorch_model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(ModelUnavailable) as caught:
        fetch(tiny_fetch(), model_id="tiny", allow_download=False, endpoint=fake_hub.url, **dirs)
    message = caught.value.message
    assert "vae/diffusion_pytorch_model.safetensors" in message and "first verified pull pinned" in message
    assert tiny_pins()["vae/diffusion_pytorch_model.safetensors"] in message


def test_an_interrupted_pull_is_completed_only_when_downloads_are_allowed(fake_hub, dirs):
    snapshot = fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)
    cached = (snapshot.folder / "unet/config.json").readlink()
    cached.resolve().unlink()  # as if the download had stopped before this file: no blob, no link
    cached.unlink()

    with pytest.raises(ModelUnavailable, match="not \\(completely\\) in the Hugging Face cache"):
        fetch(tiny_fetch(), model_id="tiny", allow_download=False, endpoint=fake_hub.url, **dirs)
    before = len(fake_hub.downloads())
    again = fetch(tiny_fetch(), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)
    assert again.files == tiny_pins()
    assert fake_hub.downloads()[before:] == [f"/{REPO}/resolve/{COMMIT}/unet/config.json"]


def test_a_revision_the_hub_does_not_have_makes_the_model_unavailable(fake_hub, dirs):
    with pytest.raises(ModelUnavailable, match="cannot download .*RevisionNotFound"):
        fetch(tiny_fetch("f" * 40), model_id="tiny", allow_download=True, endpoint=fake_hub.url, **dirs)


def test_sdxl_with_a_hub_vae_fetches_the_diffusers_components_and_the_two_vae_files(dirs):
    registry = load_registry(ROOT / "deploy" / "registry.yaml")
    entry = registry.get("sdxl-base")
    model, vae = plan(entry)
    names = [  # the layout of stabilityai/stable-diffusion-xl-base-1.0, with placeholder bytes
        "model_index.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "text_encoder/openvino_model.bin", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
        "text_encoder_2/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer_2/merges.txt",
        "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/openvino_model.xml", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx",
    ]
    server = FakeHub().start()
    try:
        server.add(model.repo, model.revision, {name: name.encode() for name in names})
        server.add(vae.repo, vae.revision, {
            "config.json": b"{}", "diffusion_pytorch_model.safetensors": b"w",
            "diffusion_pytorch_model.bin": b"p", "sdxl.vae.safetensors": b"single", "README.md": b"",
        })
        snapshots = pull(entry, allow_download=True, endpoint=server.url, **dirs)
    finally:
        server.stop()

    assert sorted(snapshots["model"].files) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(snapshots["vae"].files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert snapshots["vae"].folder == dirs["data_dir"] / "hub" / "sdxl-base" / "vae"


def test_deploy_registry_pins_real_models_and_keeps_the_tiny_model_identical():
    deploy = load_registry(ROOT / "deploy" / "registry.yaml")
    embedded = load_registry(EMBEDDED_REGISTRY)
    hub_models = [m for m in deploy.models if m.source.hub is not None]
    assert {m.id for m in hub_models} >= {"sd15", "sdxl-base"}
    assert deploy.get(deploy.default_model).source.hub is not None
    repos = {(m.source.hub.repo, m.source.hub.revision) for m in hub_models}
    assert ("stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14") in repos
    assert ("stabilityai/stable-diffusion-xl-base-1.0", "462165984030d82259a11f4367a4eed129e94a7b") in repos
    sdxl = deploy.get("sdxl-base")
    assert sdxl.dtype == "float16" and sdxl.vae.hub.repo == "madebyollin/sdxl-vae-fp16-fix"

    def without_source(registry: Registry) -> dict:
        return registry.get("sameseed-tiny").model_dump(exclude={"source"})

    assert without_source(deploy) == without_source(embedded)
    assert deploy.local_folder(deploy.get("sameseed-tiny"), Path("/data")) == TINY


def test_models_pull_command_downloads_prints_pins_and_then_works_offline(fake_hub, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": fake_hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "SAMESEED_MODELS": str(hub_registry(tmp_path, pins=False)),
        "SAMESEED_DATA_DIR": str(tmp_path / "data"),
    }
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    command = [sys.executable, "-m", "app", "models", "pull", "tiny-hub"]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert yaml.safe_load(first.stdout) == {"tiny-hub": tiny_pins()}  # pasteable as the entry's sha256 pins
    assert "tiny-hub: 12 files ready to load offline" in first.stderr
    assert "Fetching 12 files" in first.stderr  # the progress bar
    assert read_pins(tmp_path / "data") == {f"{REPO}@{COMMIT}": tiny_pins()}
    assert (tmp_path / "data" / PINS_FILE).is_file()

    downloads = len(fake_hub.downloads())
    again = subprocess.run(
        command, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == {"tiny-hub": tiny_pins()} and len(fake_hub.downloads()) == downloads

    unknown = subprocess.run([*command, "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "nope" in unknown.stderr


def test_models_pull_command_exits_1_with_the_reason_when_a_model_cannot_be_had(fake_hub, tmp_path):
    missing = "f" * 40
    env = {
        **os.environ,
        "HF_ENDPOINT": fake_hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "SAMESEED_MODELS": str(hub_registry(tmp_path, revision=missing)),
        "SAMESEED_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "app", "models", "pull"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and result.stdout == ""
    assert f"model 'tiny-hub': cannot download {REPO}@{missing}" in result.stderr


def test_only_the_hub_module_calls_huggingface_hub_downloads():
    # huggingface_hub download calls live in app/models/hub.py alone: one place pins and verifies
    callers = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "app").rglob("*.py")
        if any(name in p.read_text(encoding="utf-8") for name in ("snapshot_download", "hf_hub_download"))
    )
    assert callers == ["app/models/hub.py"]
    assert hub.VAE_FILES == VAE_FILES  # what the hub fetches for a replacement VAE is what the loader reads
