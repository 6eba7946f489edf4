"""The AUTOMATIC1111 front door, called with the `webuiapi` client over real HTTP, against a fake pool."""

import base64
import json

import httpx
import pytest
import webuiapi

from app.provenance.hashes import pixel_sha256
from app.provenance.png import MANIFEST_KEYWORD, PARAMETERS_KEYWORD, read_texts
from app.settings import Settings
from tests.support.fakes import answering_app
from tests.support.live import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    application = answering_app(Settings(data_dir=tmp_path_factory.mktemp("data"), workers="cpu:1"))
    with LiveServer(application) as server:
        yield server


@pytest.fixture()
def api(live):
    return webuiapi.WebUIApi(baseurl=f"{live.url}/sdapi/v1")  # probes /sdapi/v1/scripts at once


SMALL = {"width": 64, "height": 64, "steps": 20, "cfg_scale": 7.5}


def refused(api, **kwargs) -> dict:
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(prompt="a cat", **{**SMALL, **kwargs})
    status, text = caught.value.args
    assert status == 422, text
    error = json.loads(text)["error"]
    assert set(error) == {"type", "message", "param"}  # the project's one error body
    return error


def test_txt2img_gives_the_native_images_and_an_info_clients_parse(live, api):
    result = api.txt2img(prompt="a cat", seed=7, batch_size=2, sampler_name="PLMS", **SMALL)
    native = httpx.post(
        f"{live.url}/v1/generations", json={"prompt": "a cat", "seed": 7, "num_images": 2, "sampler": "pndm"}
    ).json()
    assert [pixel_sha256(image) for image in result.images] == [i["pixel_sha256"] for i in native["images"]]
    info = result.info  # webuiapi parsed the JSON string
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["sampler_name"] == "PLMS"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 20, 7.5)
    assert [i["latent_sha256"] for i in info["sameseed"]["images"]] == [i["latent_sha256"] for i in native["images"]]
    assert info["infotexts"][1].startswith("a cat\n") and "Seed: 8" in info["infotexts"][1]
    assert result.parameters["seed"] == 7 and result.parameters["sampler_name"] == "PLMS"
    png = base64.b64decode(result.json["images"][1])
    texts = read_texts(png)
    assert texts[PARAMETERS_KEYWORD] == info["infotexts"][1]
    assert json.loads(texts[MANIFEST_KEYWORD]) == result.json["manifest"]
    assert result.json["manifest"]["request"] == native["manifest"]["request"]


def test_batch_size_times_n_iter_images_use_seed_plus_k(api):
    result = api.txt2img(prompt="a cat", seed=10, batch_size=2, n_iter=2, **SMALL)
    assert len(result.images) == 4 and result.info["all_seeds"] == [10, 11, 12, 13]
    assert result.json["manifest"]["request"]["num_images"] == 4


def test_seed_minus_one_is_drawn_by_the_server_and_returned(api):
    result = api.txt2img(prompt="a cat", seed=-1, **SMALL)
    seed = result.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and result.json["manifest"]["request"]["seed"] == seed


@pytest.mark.parametrize(
    ("sampler_name", "scheduler", "ours"),
    [
        ("Euler a", None, "euler_a"),
        ("Euler", "Automatic", "euler"),
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "automatic", "dpmpp_2m"),
        ("k_lms", None, "lms"),
        ("UniPC", None, "unipc"),
    ],
)
def test_a1111_sampler_names_map_to_sameseeds(api, sampler_name, scheduler, ours):
    result = api.txt2img(prompt="a cat", seed=1, sampler_name=sampler_name, scheduler=scheduler, **SMALL)
    assert result.json["manifest"]["request"]["sampler"] == ours


def test_the_checkpoint_override_picks_the_model(api):
    title = next(t for t in api.util_get_model_names() if t.startswith("sameseed-bench ["))  # "id [hash]"
    for checkpoint in (title, "sameseed-bench"):
        override = {"sd_model_checkpoint": checkpoint}
        result = api.txt2img(prompt="a cat", seed=1, override_settings=override, **SMALL)
        assert result.json["manifest"]["request"]["model"] == "sameseed-bench"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
        ({"s_churn": 0.5}, "s_churn"),
        ({"sampler_name": "DPM++ SDE"}, "sampler_name"),
        ({"sampler_name": "Euler", "scheduler": "Exponential"}, "scheduler"),
        ({"sampler_name": "DDIM"}, "eta"),  # webuiapi sends eta=1.0; Sameseed's DDIM runs with eta 0
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"override_settings": {"sd_model_checkpoint": 5}}, "override_settings.sd_model_checkpoint"),
        ({"eta": 0.5}, "eta"),  # Euler a (webuiapi's default) runs with eta 1
        ({"s_noise": 0.9}, "s_noise"),
        ({"cfg_scale": 99.0}, "cfg_scale"),
        ({"width": 65}, "width"),
        ({"batch_size": 3, "n_iter": 3}, "batch_size"),
    ],
)
def test_what_sameseed_cannot_do_is_422_naming_the_field(api, kwargs, param):
    error = refused(api, **kwargs)
    assert error["param"] == param and param.split(".")[-1] in error["message"]


def test_an_unknown_checkpoint_is_404_naming_the_override(api):
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(prompt="a cat", override_settings={"sd_model_checkpoint": "v1-5-pruned"}, **SMALL)
    status, text = caught.value.args
    error = json.loads(text)["error"]
    assert status == 404 and error["type"] == "model_not_found"
    assert error["param"] == "override_settings.sd_model_checkpoint" and "sameseed-tiny" in error["message"]


def test_ddim_with_its_own_eta_runs(api):
    result = api.txt2img(prompt="a cat", seed=1, sampler_name="DDIM", eta=0.0, **SMALL)
    assert result.json["manifest"]["request"]["sampler"] == "ddim"


def test_unknown_fields_are_refused_and_fields_without_effect_are_recorded(live, api):
    response = httpx.post(f"{live.url}/sdapi/v1/txt2img", json={"prompt": "a cat", "hr_magic": 1})
    assert response.status_code == 422 and response.json()["error"]["param"] == "hr_magic"
    result = api.txt2img(prompt="a cat", seed=1, save_images=True, **SMALL)
    notes = [w for w in result.json["manifest"]["warnings"] if w["code"] == "front_door"]
    assert len(notes) == 1 and "AUTOMATIC1111" in notes[0]["message"]
    # webuiapi sends every field with A1111's defaults: the ones that change nothing are recorded
    assert "save_images=true" in notes[0]["message"] and "enable_hr=false" in notes[0]["message"]


def test_send_images_false_answers_without_images(live):
    body = {"prompt": "a cat", "seed": 1, "send_images": False}
    answer = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body).json()
    assert answer["images"] == [] and json.loads(answer["info"])["all_seeds"] == [1]


def test_the_read_routes_clients_call(live, api):
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert api.get_options()["sd_model_checkpoint"].startswith("sameseed-tiny")
    assert api.get_progress()["state"]["job_count"] == 0
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "karras"}
    assert httpx.get(f"{live.url}/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
