import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from app.provenance.comparison import load_item, run_compare
from app.provenance.drift import (
    KEY_FIELD_NAMES,
    ComparedItem,
    FieldDifference,
    compare_manifests,
    key_differences,
    key_fields,
    latent_drift,
    pixel_drift,
)
from app.provenance.hashes import pixel_sha256
from app.provenance.key import KEY_RUNTIME_FIELDS, reproducibility_key
from app.provenance.manifest import build_manifest
from app.provenance.png import embed_provenance
from tests.support.fakes import RUNTIME

ROOT = Path(__file__).resolve().parents[2]
FILES = {"unet/diffusion_pytorch_model.safetensors": "a" * 64, "vae/diffusion_pytorch_model.safetensors": "b" * 64}


def picture(shift: int = 0, size: int = 8) -> Image.Image:
    pixels = numpy.arange(size * size * 3, dtype=numpy.int32).reshape(size, size, 3) % 200 + shift
    return Image.fromarray(pixels.astype(numpy.uint8), "RGB")


def manifest(*, files=FILES, runtime=None, seed=1234, pictures=None, latents=("l0",)):
    """A manifest built by the service's own builder, so it has the real schema's shape."""
    pictures = pictures or (picture(),)
    runtime = {**RUNTIME, "versions": {**RUNTIME["versions"], "python": "3.11.9"}, **(runtime or {})}
    model = {
        "id": "sameseed-tiny",
        "family": "sd1",
        "source_kind": "local",
        "source": "/models/tiny",
        "pipeline": "StableDiffusionPipeline",
        "dtype": "float32",
        "files": files,
        "scheduler_config": {"num_train_timesteps": 1000},
    }
    key = reproducibility_key(files=files, pipeline=model["pipeline"], dtype=model["dtype"], runtime=runtime)
    images = [
        {
            "index": i,
            "seed": seed + i,
            "latent_sha256": latent,
            "pixel_sha256": pixel_sha256(image),
            "width": image.width,
            "height": image.height,
            "worker_id": "w0",
        }
        for i, (image, latent) in enumerate(zip(pictures, latents, strict=True))
    ]
    request = {
        "model": "sameseed-tiny",
        "prompt": "a photo of a cat",
        "negative_prompt": "",
        "seed": seed,
        "steps": 20,
        "guidance_scale": 7.5,
        "width": 8,
        "height": 8,
        "sampler": "pndm",
        "num_images": len(images),
    }
    built = build_manifest(
        generation_id="gen_test",
        request=request,
        model=model,
        scheduler={"class_name": "PNDMScheduler", "config": {"num_train_timesteps": 1000}},
        runtime={**runtime, "worker_id": "w0", "reproducibility_key": key, "key_fields": list(KEY_RUNTIME_FIELDS)},
        images=images,
        warnings=[],
        received="2025-01-01T00:00:00Z",
        started="2025-01-01T00:00:00Z",
        finished="2025-01-01T00:00:01Z",
    )
    return built.model_dump(mode="json")


def write(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def png_with_manifest(image: Image.Image, document, index: int = 0) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return embed_provenance(buffer.getvalue(), document, index)


# --- key fields ----------------------------------------------------------------------------


def test_key_fields_follow_the_key_definition_then_informative_fields():
    fields = key_fields(manifest())
    assert list(fields)[: len(KEY_FIELD_NAMES)] == list(KEY_FIELD_NAMES)
    assert fields["runtime.torch_threads"] == 1
    assert fields["versions.torch"] == "2.13.0"
    assert fields["versions.cuda"] is None
    assert fields["versions.python"] == "3.11.9"
    assert "runtime.image" not in fields
    assert key_fields(manifest(runtime={"image": {"version": "0.1.0"}}))["runtime.image.version"] == "0.1.0"


def test_only_threads_differ():
    assert key_differences(manifest(), manifest(runtime={"torch_threads": 2})) == [
        FieldDifference("runtime.torch_threads", 1, 2, in_key=True)
    ]


def test_non_key_fields_are_marked_not_in_key():
    other = manifest(runtime={"versions": {**RUNTIME["versions"], "python": "3.11.4"}})
    assert key_differences(manifest(), other) == [FieldDifference("versions.python", "3.11.9", "3.11.4", in_key=False)]


def test_differences_name_the_model_file_and_keep_key_order():
    other = manifest(
        files={**FILES, "vae/diffusion_pytorch_model.safetensors": "c" * 64}, runtime={"cpu_capability": "AVX512"}
    )
    differences = key_differences(manifest(), other)
    assert [d.field for d in differences] == [
        "model.files[vae/diffusion_pytorch_model.safetensors]",
        "runtime.cpu_capability",
    ]
    assert all(d.in_key for d in differences)
    missing = manifest(files={"unet/diffusion_pytorch_model.safetensors": "a" * 64})
    assert key_differences(manifest(), missing)[0].b is None


# --- drift numbers -------------------------------------------------------------------------


def test_latent_drift_numbers():
    a = numpy.zeros((1, 4, 2, 2), dtype=numpy.float32)
    b = a.copy()
    b[0, 0, 0, 0], b[0, 1, 1, 1] = 0.5, -0.25
    drift = latent_drift(a, b)
    assert drift.max_abs == 0.5
    assert drift.mean_abs == pytest.approx(0.75 / 16)
    assert latent_drift(a, a).identical


def test_latent_drift_counts_unmatched_nan_instead_of_poisoning_the_mean():
    a = numpy.array([1.0, numpy.nan, numpy.nan, 2.0])
    b = numpy.array([1.5, numpy.nan, 0.0, 2.0])
    drift = latent_drift(a, b)
    assert (drift.max_abs, drift.nonfinite) == (0.5, 1)
    assert drift.mean_abs == pytest.approx(0.25)


def test_latent_drift_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"latent shapes differ: \(1, 4\) vs \(4,\)"):
        latent_drift(numpy.zeros((1, 4)), numpy.zeros(4))


def test_pixel_drift_known_psnr():
    a = numpy.zeros((2, 2, 3), dtype=numpy.uint8)
    b = a.copy()
    b[0, 0] = 255  # one pixel, all channels: MSE = 255² * 3/12 → PSNR = 10·log10(4)
    drift = pixel_drift(a, b)
    assert (drift.max_abs, drift.changed_fraction) == (255, 0.25)
    assert drift.mean_abs == pytest.approx(255 / 4)
    assert drift.psnr_db == pytest.approx(10 * math.log10(4))
    uniform = pixel_drift(a, numpy.full((2, 2, 3), 1, dtype=numpy.uint8))
    assert uniform.psnr_db == pytest.approx(20 * math.log10(255))


def test_identical_pixels_have_infinite_psnr_and_null_in_json():
    drift = pixel_drift(picture(), picture().convert("RGBA"))
    assert drift.identical and math.isinf(drift.psnr_db)
    assert drift.to_json()["psnr_db"] is None
    json.dumps(drift.to_json(), allow_nan=False)


def test_pixel_drift_refuses_other_sizes_and_float_arrays():
    with pytest.raises(ValueError, match="image sizes differ: 8x8 vs 4x4"):
        pixel_drift(picture(), picture(size=4))
    with pytest.raises(ValueError, match="uint8"):
        pixel_drift(numpy.zeros((2, 2, 3)), numpy.zeros((2, 2, 3)))


# --- comparison ----------------------------------------------------------------------------


def test_comparison_of_equal_generations():
    result = compare_manifests([ComparedItem("a", manifest()), ComparedItem("b", manifest())])
    assert result.key_same and result.request_same and result.hashes_agree
    assert not any(row.differs for row in result.fields)
    assert result.notes == []


def test_comparison_names_differences_hashes_and_pixel_drift():
    other = manifest(runtime={"torch_threads": 2}, pictures=(picture(3),), latents=("l1",))
    result = compare_manifests(
        [ComparedItem("a", manifest(), {0: picture()}), ComparedItem("b", other, {0: picture(3)})]
    )
    assert not result.key_same and result.request_same and not result.hashes_agree
    assert [row.field for row in result.fields if row.differs] == ["runtime.torch_threads"]
    (image,) = result.images
    assert not image.latent_agree and not image.pixel_agree
    (pair,) = image.pixel_drift
    assert (pair.label, pair.reference, pair.drift.max_abs) == ("b", "a", 3)
    document = result.to_json()
    json.dumps(document, allow_nan=False)
    assert document["images"][0]["pixel_drift"][0]["max_abs"] == 3


def test_comparison_notes_pixels_that_do_not_match_their_manifest_and_edited_keys():
    edited = manifest()
    edited["runtime"]["torch_threads"] = 4  # the recorded key no longer matches
    result = compare_manifests([ComparedItem("a", manifest(), {0: picture(9)}), ComparedItem("b", edited)])
    assert any("a: the pixels of image 0" in note for note in result.notes)
    assert any("b: the recorded reproducibility key does not match" in note for note in result.notes)


def test_comparison_needs_two_items():
    with pytest.raises(ValueError, match="at least 2"):
        compare_manifests([ComparedItem("a", manifest())])


# --- compare command -----------------------------------------------------------------------


def run(paths, as_json=False):
    out, err = io.StringIO(), io.StringIO()
    code = run_compare(paths, as_json=as_json, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_compare_exit_0_when_hashes_agree(tmp_path):
    a = write(tmp_path / "a.json", manifest())
    b = write(tmp_path / "b.json", {"id": "gen_test", "images": [], "manifest": manifest()})
    code, out, _ = run([a, b])
    assert code == 0
    assert "reproducibility key: same" in out and "hashes: all agree" in out


def test_compare_exit_1_and_the_table_marks_the_differing_field(tmp_path):
    a = write(tmp_path / "a.json", manifest())
    b = write(tmp_path / "b.json", manifest(runtime={"torch_threads": 2}, latents=("other",)))
    code, out, _ = run([a, b])
    assert code == 1
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(marked) == 1 and "runtime.torch_threads" in marked[0]
    assert "reproducibility key: different (runtime.torch_threads)" in out
    assert "image 0 (seed 1234): latent hash DIFFER, pixel hash same" in out


def test_compare_json_output(tmp_path):
    a = write(tmp_path / "a.json", manifest())
    b = write(tmp_path / "b.json", manifest(seed=99, latents=("l99",)))
    code, out, _ = run([a, b], as_json=True)
    document = json.loads(out)
    assert code == 1
    assert document["key_same"] is True and document["request_same"] is False
    assert {row["field"] for row in document["request"] if row["differs"]} == {"request.seed"}


def test_compare_reads_pngs_and_response_images_for_pixel_drift(tmp_path):
    moved = manifest(pictures=(picture(), picture(5)), latents=("l0", "l1x"))
    (tmp_path / "a.png").write_bytes(png_with_manifest(picture(5), moved, index=1))
    buffer = io.BytesIO()
    picture(1).save(buffer, format="PNG")
    first = manifest(pictures=(picture(), picture(1)), latents=("l0", "l1"))
    response = {
        "id": "gen_test",
        "images": [{"index": 1, "seed": 1235, "png_base64": base64.b64encode(buffer.getvalue()).decode()}],
        "manifest": first,
    }
    items = [load_item(write(tmp_path / "r.json", response)), load_item(tmp_path / "a.png")]
    assert set(items[1].images) == {1}  # found by its pixel hash
    code, out, _ = run([tmp_path / "r.json", tmp_path / "a.png"])
    assert code == 1
    assert "image 0 (seed 1234): latent hash same, pixel hash same" in out
    assert "a.png vs r.json: max abs 4" in out and "PSNR" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "neither a PNG nor valid JSON"),
        (b'{"format": "other/9"}', "unsupported manifest format"),
        (b"[1, 2]", "no Sameseed manifest"),
        (b"\x89PNG\r\n\x1a\ngarbage", "truncated PNG chunk"),
    ],
)
def test_compare_exit_2_names_the_bad_file(tmp_path, content, message):
    good = write(tmp_path / "good.json", manifest())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    code, out, err = run([good, bad])
    assert code == 2 and out == ""
    assert str(bad) in err and message in err


def test_compare_exit_2_on_a_missing_file_or_a_single_argument(tmp_path):
    good = write(tmp_path / "good.json", manifest())
    assert run([good, tmp_path / "missing.json"])[0] == 2
    assert run([good])[0] == 2


def test_compare_cli_subprocess(tmp_path):
    a = write(tmp_path / "a.json", manifest())
    b = write(tmp_path / "b.json", manifest(runtime={"torch_threads": 2}, latents=("other",)))
    result = subprocess.run(
        [sys.executable, "-m", "app", "compare", str(a), str(b)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "* runtime.torch_threads" in result.stdout


def test_an_image_missing_from_one_item_never_agrees():
    two = manifest(pictures=(picture(), picture(1)), latents=("l0", "l1"))
    result = compare_manifests([ComparedItem("a", manifest()), ComparedItem("b", two)])
    assert [(i.index, i.latent_agree, i.pixel_agree) for i in result.images] == [(0, True, True), (1, False, False)]
    assert result.images[1].seeds == [None, 1235]
    assert not result.hashes_agree
