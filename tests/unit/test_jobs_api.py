"""Jobs over HTTP with a fake pool: async submission, status, SSE events and resume, cancellation, restarts, keys."""

import base64
import io
import time

import pytest
from fastapi.testclient import TestClient
from httpx_sse import connect_sse
from PIL import Image

from app.main import create_app
from app.settings import Settings
from app.store.ledger import JobRow, JobState, SqliteLedger
from app.worker.messages import RenderImage
from tests.support.fakes import FakePool

ASYNC = {"Prefer": "respond-async"}


def make_client(tmp_path, pools, *, auto=True, auto_steps=0, **settings):
    def factory(configs):
        pool = FakePool(configs, auto=auto, auto_steps=auto_steps)
        pools.append(pool)
        return pool

    return TestClient(create_app(Settings(data_dir=tmp_path, workers="cpu:1", **settings), pool_factory=factory))


def poll(client, path, until, timeout=5.0, **kwargs):
    """GET `path` until `until(json)` holds (deadline, no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path, **kwargs).json()
        if until(body):
            return body
        assert time.monotonic() < deadline, f"not reached: {body}"
        time.sleep(0.01)


def events_of(client, path, headers=None):
    with connect_sse(client, "GET", path, headers=headers or {}) as source:
        assert source.response.status_code == 200, source.response.read()
        return [(int(e.id), e.event, e.json()) for e in source.iter_sse()]


def test_async_job_answers_202_then_its_status_then_the_synchronous_answer(tmp_path):
    with make_client(tmp_path, []) as client:
        accepted = client.post("/v1/generations", json={"prompt": "a cat", "seed": 5, "num_images": 2}, headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert accepted.headers["location"] == f"/v1/generations/{job['id']}"
        assert accepted.headers["preference-applied"] == "respond-async"
        assert job["state"] in ("queued", "running") and job["num_images"] == 2 and job["result"] is None
        done = poll(client, accepted.headers["location"], lambda b: b["state"] == "succeeded")
        sync = client.post("/v1/generations", json={"prompt": "a cat", "seed": 5, "num_images": 2}).json()
        result = done["result"]
        assert result["id"] == job["id"] and done["images_done"] == 2 and done["error"] is None
        assert [(i["seed"], i["latent_sha256"], i["pixel_sha256"]) for i in result["images"]] == [
            (i["seed"], i["latent_sha256"], i["pixel_sha256"]) for i in sync["images"]
        ]
        assert all(i["png_base64"] for i in result["images"])
        assert result["manifest"]["request"] == sync["manifest"]["request"]
        # the images are stored like any generation's
        assert client.get(result["images"][1]["url"]).status_code == 200


def test_an_async_request_is_validated_before_it_is_accepted(tmp_path):
    with make_client(tmp_path, []) as client:
        refused = client.post("/v1/generations", json={"prompt": "a cat", "steps": 10_000}, headers=ASYNC)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "steps"


def test_event_stream_has_every_step_of_a_two_image_job_in_order_and_resumes_after_last_event_id(tmp_path):
    with make_client(tmp_path, [], auto_steps=3) as client:
        job = client.post("/v1/generations", json={"prompt": "a cat", "seed": 9, "num_images": 2}, headers=ASYNC)
        path = f"/v1/generations/{job.json()['id']}/events"
        events = events_of(client, path)
        assert [e[0] for e in events] == list(range(1, len(events) + 1))  # numbered without gaps
        names = [e[1] for e in events if e[1] != "queued"]
        assert names == ["started", "step", "step", "step", "image", "step", "step", "step", "image", "succeeded"]
        steps = [(d["index"], d["step"], d["steps"]) for _, name, d in events if name == "step"]
        assert steps == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 3), (1, 2, 3), (1, 3, 3)]
        images = [d for _, name, d in events if name == "image"]
        assert [(d["index"], d["seed"]) for d in images] == [(0, 9), (1, 10)]
        final = events[-1][2]
        assert [i["latent_sha256"] for i in final["images"]] == [d["latent_sha256"] for d in images]
        # a client that saw up to event k gets exactly the rest
        for k in (0, 3, len(events) - 1, len(events)):
            assert events_of(client, path, {"Last-Event-ID": str(k)}) == events[k:]
        bad = client.get(path, headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "Last-Event-ID"
        assert client.get("/v1/generations/gen_0123456789abcdef/events").status_code == 404


def test_synchronous_post_accepting_an_event_stream_streams_the_events_and_ends_with_the_answer(tmp_path):
    with make_client(tmp_path, [], auto_steps=2) as client:
        body = {"prompt": "a cat", "seed": 4, "response_format": "url"}
        with connect_sse(client, "POST", "/v1/generations", json=body) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            events = [(e.event, e.json()) for e in source.iter_sse()]
        assert [name for name, _ in events if name != "queued"] == ["started", "step", "step", "image", "succeeded"]
        answer = events[-1][1]
        sync = client.post("/v1/generations", json=body).json()
        assert answer["images"][0]["latent_sha256"] == sync["images"][0]["latent_sha256"]
        assert answer["images"][0]["png_base64"] is None
        assert answer["manifest"]["request"] == sync["manifest"]["request"]


def renders(pool, job_id):
    return [m for _, m in pool.sent if isinstance(m, RenderImage) and m.job_id == job_id]


def test_cancel_removes_a_queued_job_at_once_and_stops_a_running_one_freeing_its_worker(tmp_path):
    pools = []
    with make_client(tmp_path, pools, auto=False) as client:
        pool = pools[0]
        client.portal.call(pool.ready, "w0")
        running = client.post("/v1/generations", json={"prompt": "a", "steps": 20}, headers=ASYNC).json()
        queued = client.post("/v1/generations", json={"prompt": "b"}, headers=ASYNC).json()
        assert queued["state"] == "queued" and queued["queue_position"] == 1
        message = renders(pool, running["id"])[0]
        for step in (1, 2, 3):
            client.portal.call(pool.step, "w0", message, step, 20)
        status = client.get(f"/v1/generations/{running['id']}").json()
        assert status["state"] == "running" and status["progress"] == {"index": 0, "step": 3, "steps": 20}

        canceled = client.post(f"/v1/generations/{queued['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
        assert canceled.json()["error"]["type"] == "canceled" and pool.cancels == []

        stopped = client.post(f"/v1/generations/{running['id']}/cancel").json()
        assert stopped["state"] == "canceled" and stopped["steps_done"] == 3
        assert pool.cancels == ["w0"]  # the worker was told to stop at its next step
        client.portal.call(pool.stop_canceled, "w0", message, 3)
        assert client.get("/readyz").json()["workers"][0]["state"] == "ready"
        assert renders(pool, queued["id"]) == []  # the queued job never reached a worker

        # the freed worker takes the next job; canceling a finished job changes nothing
        following = client.post("/v1/generations", json={"prompt": "c"}, headers=ASYNC).json()
        client.portal.call(pool.answer, "w0", renders(pool, following["id"])[0])
        poll(client, f"/v1/generations/{following['id']}", lambda b: b["state"] == "succeeded")
        assert client.post(f"/v1/generations/{following['id']}/cancel").json()["state"] == "succeeded"
        events = events_of(client, f"/v1/generations/{running['id']}/events")
        assert events[-1][1] == "canceled" and events[-1][2]["steps_done"] == 3

    # the ledger keeps the final states with the steps done
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    row = ledger.get_job(running["id"])
    assert (row.state, row.steps_done) == (JobState.CANCELED, 3)
    assert ledger.get_job(queued["id"]).state is JobState.CANCELED
    ledger.close()


def test_a_job_left_unfinished_by_a_killed_server_is_reported_failed_after_restart(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.migrate()
    params = (
        '{"model": "sameseed-tiny", "prompt": "a", "negative_prompt": "", "seed": 1, "steps": 20, '
        '"guidance_scale": 7.5, "width": 64, "height": 64, "sampler": "pndm", "num_images": 1}'
    )
    at = "2026-01-01T00:00:00.000000Z"
    ledger.insert_job(JobRow("gen_0123456789abcdef", JobState.QUEUED, params, "b64_png", at, at))
    ledger.close()
    with make_client(tmp_path, []) as client:
        status = client.get("/v1/generations/gen_0123456789abcdef")
        assert status.status_code == 200, status.text
        assert status.json()["state"] == "failed" and status.json()["error"]["type"] == "interrupted"
        events = events_of(client, "/v1/generations/gen_0123456789abcdef/events")
        assert [(i, name) for i, name, _ in events] == [(1, "failed")]


@pytest.fixture()
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text("alice-key-0123456789\nbob-key-0123456789ab\nadmin root-key-0123456789a\n")
    return path


def test_a_job_is_visible_only_to_the_api_key_that_made_it_and_admin_keys(tmp_path, keys_file):
    alice = {"Authorization": "Bearer alice-key-0123456789"}
    bob = {"Authorization": "Bearer bob-key-0123456789ab"}
    with make_client(tmp_path / "data", [], api_keys_file=keys_file) as client:
        job = client.post("/v1/generations", json={"prompt": "a"}, headers={**ASYNC, **alice}).json()
        path = f"/v1/generations/{job['id']}"
        poll(client, path, lambda b: b.get("state") == "succeeded", headers=alice)
        for suffix, method in (("", "GET"), ("/events", "GET"), ("/cancel", "POST")):
            refused = client.request(method, path + suffix, headers=bob)
            assert refused.status_code == 404 and refused.json()["error"]["type"] == "generation_not_found"
        assert client.get(path + "/events", headers=alice).status_code == 200
        admin = {"Authorization": "Bearer root-key-0123456789a"}  # an admin key sees every job
        assert client.get(path, headers=admin).json()["state"] == "succeeded"
        assert client.get("/v1/models", headers={"Authorization": "Bearer admin"}).status_code == 401


def test_a1111_progress_reads_the_running_jobs_steps(tmp_path):
    pools = []
    with make_client(tmp_path, pools, auto=False) as client:
        pool = pools[0]
        client.portal.call(pool.ready, "w0")
        idle = client.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        job = client.post("/v1/generations", json={"prompt": "a", "steps": 10, "num_images": 2}, headers=ASYNC).json()
        client.post("/v1/generations", json={"prompt": "b"}, headers=ASYNC)  # queued behind it
        message = renders(pool, job["id"])[0]
        for step in (1, 2, 3, 4, 5):
            client.portal.call(pool.step, "w0", message, step, 10)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 0.25  # 5 of 2 x 10 steps
        assert progress["state"]["job"] == job["id"] and progress["state"]["job_count"] == 2
        assert (progress["state"]["sampling_step"], progress["state"]["sampling_steps"]) == (5, 10)
        assert progress["eta_relative"] > 0


def test_step_events_carry_a_preview_only_when_the_job_asked_and_the_result_is_the_same(tmp_path):
    with make_client(tmp_path, [], auto_steps=2) as client:
        body = {"prompt": "a cat", "seed": 3, "num_images": 2}
        plain = client.post("/v1/generations", json=body, headers=ASYNC).json()
        watched = client.post("/v1/generations", json={**body, "previews": True}, headers=ASYNC).json()
        plain_events = events_of(client, f"/v1/generations/{plain['id']}/events")
        watched_events = events_of(client, f"/v1/generations/{watched['id']}/events")
        assert [name for _, name, _ in plain_events] == [name for _, name, _ in watched_events]
        plain_steps = [d for _, name, d in plain_events if name == "step"]
        watched_steps = [d for _, name, d in watched_events if name == "step"]
        assert len(watched_steps) == 4 and all("preview" not in d for d in plain_steps)
        for step in watched_steps:
            image = Image.open(io.BytesIO(base64.b64decode(step["preview"], validate=True)))
            assert image.format == "PNG" and image.size[0] > 0
        # previews are not a generation parameter: the images, hashes and manifest request are the same
        first, second = events_of(client, f"/v1/generations/{plain['id']}/events")[-1][2], watched_events[-1][2]
        assert [i["latent_sha256"] for i in first["images"]] == [i["latent_sha256"] for i in second["images"]]
        assert first["manifest"]["request"] == second["manifest"]["request"]
        assert "previews" not in second["manifest"]["request"]
        status = client.get(f"/v1/generations/{watched['id']}").json()
        assert "preview" not in (status["progress"] or {})


def test_previews_without_step_events_are_refused_not_ignored(tmp_path):
    with make_client(tmp_path, []) as client:
        refused = client.post("/v1/generations", json={"prompt": "a cat", "previews": True})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "previews"
