import hashlib

import numpy
import pytest
from PIL import Image

from app.models.registry import RegistryError, load_registry
from app.provenance.hashes import pixel_sha256
from app.provenance.key import key_material, reproducibility_key, runtime_group_key
from app.provenance.manifest import canonical_json
from tests.support.fakes import RUNTIME

FILES = {"unet/diffusion_pytorch_model.safetensors": "0" * 64, "model_index.json": "1" * 64}


def key(**runtime_changes):
    return reproducibility_key(
        files=FILES, pipeline="StableDiffusionPipeline", dtype="float32", runtime={**RUNTIME, **runtime_changes}
    )


def test_canonical_json_sorts_keys_and_has_no_whitespace():
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(
    "change", [{"torch_threads": 2}, {"cpu_capability": "AVX512"}, {"mkldnn": False}, {"device_name": "Other CPU"}]
)
def test_key_changes_with_every_field_that_changes_bits(change):
    assert key(**change) != key()


def test_key_ignores_worker_identity_and_python_version():
    assert key(worker_id="w7", pid=42) == key()
    assert key(versions={**RUNTIME["versions"], "python": "3.11.9"}) == key()


def test_key_changes_with_model_files_and_dtype():
    other = reproducibility_key(
        files={**FILES, "model_index.json": "2" * 64},
        pipeline="StableDiffusionPipeline",
        dtype="float32",
        runtime=RUNTIME,
    )
    assert other != key()
    bf16 = reproducibility_key(files=FILES, pipeline="StableDiffusionPipeline", dtype="bfloat16", runtime=RUNTIME)
    assert bf16 != key()


def test_key_is_the_documented_hash_of_its_material():
    material = key_material(files=FILES, pipeline="StableDiffusionPipeline", dtype="float32", runtime=RUNTIME)
    assert key() == "rk1-" + hashlib.sha256(canonical_json(material)).hexdigest()


def test_group_key_ignores_the_model():
    assert runtime_group_key(RUNTIME) == runtime_group_key({**RUNTIME, "worker_id": "w3"})
    assert runtime_group_key(RUNTIME) != runtime_group_key({**RUNTIME, "torch_threads": 4})


def test_pixel_hash_is_sha256_of_rgb_bytes_whatever_the_mode():
    pixels = numpy.arange(4 * 4 * 3, dtype=numpy.uint8).reshape(4, 4, 3)
    rgb = Image.fromarray(pixels, "RGB")
    assert pixel_sha256(rgb) == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert pixel_sha256(rgb.convert("RGBA")) == pixel_sha256(rgb)


REGISTRY = """
version: 1
default_model: m
models:
  - id: m
    family: sd1
    source: {SOURCE}
    defaults: {{width: 64, height: 64}}
"""


def test_registry_refuses_a_hub_branch_instead_of_a_commit(registry_file):
    path = registry_file(REGISTRY.format(SOURCE="{hub: {repo: org/model, revision: main}}"))
    with pytest.raises(RegistryError, match="40-hex commit"):
        load_registry(path)


def test_registry_refuses_two_sources(registry_file):
    path = registry_file(REGISTRY.format(SOURCE="{local: a, build: sameseed-tiny}"))
    with pytest.raises(RegistryError, match="exactly one"):
        load_registry(path)


def test_registry_resolves_local_paths_next_to_the_file(registry_file, tmp_path):
    registry = load_registry(registry_file(REGISTRY.format(SOURCE="{local: folder}")))
    assert registry.local_folder(registry.models[0], tmp_path / "data") == (tmp_path / "folder").resolve()


def test_embedded_registry_pins_every_file_of_the_tiny_model(registry):
    tiny = registry.get("sameseed-tiny")
    assert tiny is not None and registry.default_model == "sameseed-tiny"
    folder = registry.local_folder(tiny, registry.base_dir)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk and set(tiny.sha256) == on_disk


def test_an_unwritable_baselines_file_still_gives_a_verdict(tmp_path):
    from app.provenance.golden import Baseline, BaselineStore

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = BaselineStore(blocker / "baselines.json")  # its folder cannot be created
    actual = Baseline(
        case="pndm-default", suite_version=1, model="sameseed-tiny", reproducibility_key="rk1-" + "a" * 64,
        latent_sha256="b" * 64, pixel_sha256="c" * 64, recorded_at="2026-11-22T00:00:00Z",
    )
    assert store.judge(actual).state == "baseline_recorded"
    assert store.judge(actual).state == "consistent"  # kept in memory
