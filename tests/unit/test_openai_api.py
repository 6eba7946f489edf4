"""The OpenAI Images API front door, called with the official `openai` SDK over real HTTP, against a fake pool."""

import asyncio
import base64
import hashlib
import io
import json
import threading
import time

import httpx
import httpx2
import numpy
import openai
import pytest
from PIL import Image

from app.main import create_app
from app.provenance.png import MANIFEST_KEYWORD, read_texts
from app.settings import Settings
from app.worker.messages import RenderImage
from tests.support.fakes import FakePool, answering_app
from tests.support.live import LiveServer

KEY = "test-key-0123456789abcdef"


def pixel_sha256(png: bytes) -> str:
    # the README's definition, recomputed here as a user would
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.uint8)
    return hashlib.sha256(pixels.tobytes()).hexdigest()


class HoldingPool(FakePool):
    """Workers get ready at once but images wait until the test releases them (from its own thread)."""

    def start(self) -> None:
        super().start()
        self.loop = asyncio.get_running_loop()
        for worker_id in self.workers:
            self.ready(worker_id)

    def release(self) -> None:
        def answer_all() -> None:
            self.auto = True
            for worker_id, message in self.sent:
                if isinstance(message, RenderImage):
                    self.answer(worker_id, message)

        self.loop.call_soon_threadsafe(answer_all)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    application = answering_app(Settings(data_dir=tmp_path_factory.mktemp("data"), workers="cpu:1"))
    with LiveServer(application) as server:
        yield server


@pytest.fixture()
def sdk(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused-without-keys", max_retries=0) as client:
        yield client


def test_sdk_generates_two_images_equal_to_the_native_route(live, sdk):
    result = sdk.images.generate(
        model="sameseed-tiny", prompt="a cat", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 7}
    )
    native = httpx.post(f"{live.url}/v1/generations", json={"prompt": "a cat", "seed": 7, "num_images": 2}).json()
    assert len(result.data) == 2
    assert [image.revised_prompt for image in result.data] == [None, None]
    pngs = [base64.b64decode(image.b64_json) for image in result.data]
    assert [pixel_sha256(png) for png in pngs] == [image["pixel_sha256"] for image in native["images"]]
    extra = result.model_dump()
    assert [image["seed"] for image in extra["data"]] == [7, 8]
    assert [image["latent_sha256"] for image in extra["data"]] == [i["latent_sha256"] for i in native["images"]]
    manifest = extra["manifest"]
    assert manifest["id"] == extra["id"] and extra["id"].startswith("gen_")
    assert manifest["request"] == {**native["manifest"]["request"]}
    assert json.loads(read_texts(pngs[1])[MANIFEST_KEYWORD]) == manifest  # the PNG carries the signed manifest
    assert isinstance(result.created, int) and result.size == "64x64" and result.output_format == "png"


def test_sameseed_parameters_pass_through_extra_body(sdk):
    result = sdk.images.generate(
        prompt="a cat",
        extra_body={"seed": 3, "steps": 5, "sampler": "euler_a", "negative_prompt": "dogs", "guidance_scale": 4.0},
    )
    request = result.model_dump()["manifest"]["request"]
    assert (request["seed"], request["steps"], request["sampler"]) == (3, 5, "euler_a")
    assert (request["negative_prompt"], request["guidance_scale"]) == ("dogs", 4.0)
    assert result.data[0].b64_json and result.data[0].url is None  # b64_json is the default


def test_url_format_gives_an_absolute_link_to_the_stored_png(live, sdk):
    result = sdk.images.generate(prompt="a cat", response_format="url", extra_body={"seed": 1})
    url = result.data[0].url
    assert url.startswith(live.url + "/v1/generations/") and result.data[0].b64_json is None
    png = httpx.get(url).content
    assert pixel_sha256(png) == result.model_dump()["data"][0]["pixel_sha256"]


def test_fields_without_effect_are_accepted_and_recorded_in_the_signed_manifest(sdk):
    result = sdk.images.generate(prompt="a cat", user="alice", moderation="low", output_format="png")
    notes = [w for w in result.model_dump()["manifest"]["warnings"] if w["code"] == "front_door"]
    assert len(notes) == 1
    assert "OpenAI Images API" in notes[0]["message"]
    assert 'user="alice"' in notes[0]["message"] and 'moderation="low"' in notes[0]["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"quality": "hd"}, "quality"),
        ({"style": "vivid"}, "style"),
        ({"background": "transparent"}, "background"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"size": "65x64"}, "size"),
        ({"size": "huge"}, "size"),
        ({"n": 9}, "n"),
        ({"extra_body": {"cfg": 7}}, "cfg"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"extra_body": {"sampler": "k_lms"}}, "sampler"),
    ],
)
def test_what_cannot_be_honoured_is_a_bad_request_naming_the_field(sdk, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="a cat", **kwargs)
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert error.type == "invalid_request_error" and error.code == "invalid_request"
    assert param in error.message


def test_unknown_model_is_not_found_in_openai_shape(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.images.generate(prompt="a cat", model="dall-e-3")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_the_api_key_is_the_sdks_api_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    application = answering_app(Settings(data_dir=tmp_path / "data", workers="cpu:1", api_keys_file=keys))
    with LiveServer(application) as live:
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key="not-the-key-at-all", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.images.generate(prompt="a cat")
        assert caught.value.status_code == 401 and caught.value.code == "unauthorized"
        assert caught.value.type == "authentication_error"
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0) as right:
            assert len(right.images.generate(prompt="a cat").data) == 1
        # elsewhere the project's one error body stays
        assert set(httpx.get(f"{live.url}/v1/models").json()["error"]) == {"type", "message", "param"}


def test_a_full_queue_is_a_rate_limit_error_and_the_sdk_retries_after_retry_after(tmp_path):
    pools = []

    def factory(configs):
        pools.append(HoldingPool(configs))
        return pools[0]

    application = create_app(Settings(data_dir=tmp_path, workers="cpu:1", max_queue=1), pool_factory=factory)
    with LiveServer(application) as live:
        # the worker holds what it was sent (the start-up golden check, then a request): a request
        # waits, and the queue (1) is full
        holders = [
            threading.Thread(target=httpx.post, args=(f"{live.url}/v1/generations",), kwargs={"json": {"prompt": p}})
            for p in ("a", "b")
        ]
        for thread in holders:
            thread.start()
        deadline = time.monotonic() + 10
        while _waiting(live) < 1:
            assert time.monotonic() < deadline, "the held requests did not arrive"
            time.sleep(0.01)
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0) as impatient:
            with pytest.raises(openai.RateLimitError) as caught:
                impatient.images.generate(prompt="a cat")
        retry_after = int(caught.value.response.headers["retry-after"])
        assert retry_after >= 1 and caught.value.code == "queue_full" and caught.value.type == "rate_limit_error"

        statuses: list[int] = []

        def on_response(response: httpx2.Response) -> None:
            statuses.append(response.status_code)
            if response.status_code == 429:  # the queue drains while the SDK waits
                pools[0].release()

        http_client = httpx2.Client(event_hooks={"response": [on_response]})
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=2, http_client=http_client) as patient:
            started = time.monotonic()
            result = patient.images.generate(prompt="a cat")
            waited = time.monotonic() - started
        assert statuses == [429, 200] and len(result.data) == 1
        assert waited >= 0.9 * int(retry_after)  # the SDK slept what Retry-After said, not its own backoff
        for thread in holders:
            thread.join(timeout=10)


def _waiting(live) -> int:
    text = httpx.get(f"{live.url}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("sameseed_queue_depth"))
    return int(float(line.split()[-1]))


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b'{"n": 1}', "prompt", "invalid_request"),
        (b"[]", None, "invalid_request"),
        (b'{"prompt": "a",}', None, "malformed_request"),
        (b'{"prompt": "a", "n": "2"}', "n", "invalid_request"),
    ],
)
def test_raw_bodies_that_are_not_requests_are_400_in_openai_shape(live, raw, param, code):
    response = httpx.post(
        f"{live.url}/v1/images/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_1_mib_is_413_in_openai_shape(live, chunked):
    body = json.dumps({"prompt": "a" * (2 << 20)}).encode()
    content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    response = httpx.post(
        f"{live.url}/v1/images/generations", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "1 MiB" in error["message"]
