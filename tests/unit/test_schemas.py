import pytest
from pydantic import ValidationError

from app.api.schemas import MAX_SEED, GenerationRequest


def errors_of(**body):
    with pytest.raises(ValidationError) as info:
        GenerationRequest.model_validate(body)
    return {".".join(map(str, e["loc"])): e["type"] for e in info.value.errors()}


def test_minimal_request_leaves_model_defaults_open():
    request = GenerationRequest.model_validate({"prompt": "a cat"})
    assert request.seed is None and request.steps is None and request.num_images == 1


def test_unknown_field_is_refused_by_name():
    assert errors_of(prompt="a", cfg_scale=7) == {"cfg_scale": "extra_forbidden"}


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_outside_javascript_safe_range_is_refused(seed):
    assert "seed" in errors_of(prompt="a", seed=seed)


def test_largest_javascript_safe_seed_is_accepted():
    assert GenerationRequest.model_validate({"prompt": "a", "seed": MAX_SEED}).seed == MAX_SEED


@pytest.mark.parametrize("value", ["5", 5.5, True])
def test_integers_are_not_coerced_from_strings_floats_or_booleans(value):
    assert "steps" in errors_of(prompt="a", steps=value)


def test_guidance_scale_accepts_an_integer_but_not_infinity():
    assert GenerationRequest.model_validate({"prompt": "a", "guidance_scale": 7}).guidance_scale == 7
    assert "guidance_scale" in errors_of(prompt="a", guidance_scale=float("inf"))


@pytest.mark.parametrize("n", [0, 9])
def test_num_images_is_one_to_eight(n):
    assert "num_images" in errors_of(prompt="a", num_images=n)


def test_unknown_sampler_and_empty_prompt_are_refused():
    found = errors_of(prompt="", sampler="k_euler")
    assert set(found) == {"prompt", "sampler"}


def test_a_nul_character_in_a_prompt_is_refused():
    assert errors_of(prompt="a\x00cat") == {"prompt": "value_error"}
    assert errors_of(prompt="a", negative_prompt="\x00") == {"negative_prompt": "value_error"}
