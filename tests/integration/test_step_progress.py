"""Step progress in process on the real tiny pipelines: the callback only reads (previews too) and can stop an image."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app.models.registry import load_registry
from app.params import GenerationParams
from app.pipeline.generate import render_image
from app.pipeline.loader import load_model, resolve_paths
from tests.support.model_variants import TINY, TINY_XL

REGISTRY = """
version: 1
default_model: sd1
models:
  - {{id: sd1, family: sd1, source: {{local: {tiny}}}, defaults: {{width: 64, height: 64}}}}
  - {{id: xl, family: sdxl, source: {{local: {xl}}}, defaults: {{width: 64, height: 64}}}}
"""


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    (root / "registry.yaml").write_text(REGISTRY.format(tiny=TINY, xl=TINY_XL))
    registry = load_registry(root / "registry.yaml")

    def get(model_id):
        entry = registry.get(model_id)
        return load_model(entry, resolve_paths(entry, registry, root, False), "cpu")

    return get


@pytest.mark.parametrize(("model_id", "sampler"), [("sd1", "pndm"), ("sd1", "euler_a"), ("xl", "euler")])
def test_hashes_are_equal_with_and_without_a_step_listener(load, model_id, sampler):
    model = load(model_id)
    params = GenerationParams(model_id, "a photo of a cat", "", 11, 6, 7.5, 64, 64, sampler, 1)
    steps: list[tuple[int, int]] = []
    quiet = render_image(model, params)
    heard = render_image(model, params, lambda step, total: steps.append((step, total)))
    assert (heard.latent_sha256, heard.pixel_sha256) == (quiet.latent_sha256, quiet.pixel_sha256)
    total = steps[-1][1]
    assert total >= params.steps and steps == [(k, total) for k in range(1, total + 1)]


def test_a_listener_that_raises_stops_the_image_at_that_step_and_the_next_image_is_unaffected(load):
    model = load("sd1")
    params = GenerationParams("sd1", "a photo of a cat", "", 11, 6, 7.5, 64, 64, "euler_a", 1)
    before = render_image(model, params)
    seen = []

    class Stop(Exception):
        pass

    def stop_at_two(step, total):
        seen.append(step)
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        render_image(model, params, stop_at_two)
    assert seen == [1, 2]
    after = render_image(model, params)
    assert (after.latent_sha256, after.pixel_sha256) == (before.latent_sha256, before.pixel_sha256)


@pytest.mark.parametrize(("model_id", "sampler"), [("sd1", "euler_a"), ("xl", "euler")])
def test_hashes_are_equal_with_and_without_previews_and_each_step_has_a_latent_sized_png(load, model_id, sampler):
    model = load(model_id)
    params = GenerationParams(model_id, "a photo of a cat", "", 11, 6, 7.5, 64, 48, sampler, 1)
    previews: list[tuple[int, bytes]] = []
    plain = render_image(model, params, lambda step, total: None)
    watched = render_image(
        model, params, lambda step, total, preview: previews.append((step, preview)), previews=True
    )
    assert (watched.latent_sha256, watched.pixel_sha256) == (plain.latent_sha256, plain.pixel_sha256)
    assert watched.latents == plain.latents and watched.png == plain.png
    assert [step for step, _ in previews] == list(range(1, len(previews) + 1)) and len(previews) >= params.steps
    scale = model.pipe.vae_scale_factor  # one preview pixel per latent cell (8 on full-size models, 2 on tiny ones)
    for _, png in previews:
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64 // scale, 48 // scale))
    # the approximation follows the latents: the last preview differs from the first (pure noise)
    assert previews[0][1] != previews[-1][1]
