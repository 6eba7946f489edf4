"""Jobs on the real server: an SSE client sees every step of a 2-image job; a canceled running job frees its worker."""

from __future__ import annotations

import time

from httpx_sse import connect_sse

ASYNC = {"Prefer": "respond-async"}


def test_an_sse_client_sees_every_step_of_a_two_image_job_and_the_bits_match_a_synchronous_call(server):
    body = {"prompt": "a photo of a cat", "seed": 21, "num_images": 2, "steps": 4, "response_format": "url"}
    accepted = server.client.post("/v1/generations", json=body, headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    with connect_sse(server.client, "GET", accepted.headers["location"] + "/events") as source:
        events = [(e.event, e.json()) for e in source.iter_sse()]
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and "failed" not in names
    steps = [(d["index"], d["step"]) for name, d in events if name == "step"]
    per_image = len(steps) // 2
    # one at a time, or co-batched (both images step together): each image reports every step, in order
    assert per_image >= 4 and sorted(steps) == [(i, k) for i in (0, 1) for k in range(1, per_image + 1)]
    assert all([k for j, k in steps if j == i] == list(range(1, per_image + 1)) for i in (0, 1))
    streamed = [(d["seed"], d["latent_sha256"], d["pixel_sha256"]) for name, d in events if name == "image"]
    synchronous = server.generate(**body)
    assert streamed == [(i["seed"], i["latent_sha256"], i["pixel_sha256"]) for i in synchronous["images"]]
    status = server.client.get(accepted.headers["location"]).json()
    assert status["state"] == "succeeded" and status["result"]["images"][1]["latent_sha256"] == streamed[1][1]


def test_a_canceled_running_job_stops_at_a_step_boundary_and_frees_its_worker(server):
    accepted = server.client.post("/v1/generations", json={"prompt": "a cat", "steps": 150}, headers=ASYNC)
    location = accepted.headers["location"]
    with connect_sse(server.client, "GET", location + "/events") as source:
        events = source.iter_sse()
        first_step = next(e for e in events if e.event == "step")
        canceled = server.client.post(location + "/cancel")
        rest = [(e.event, e.json()) for e in events]
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    assert rest[-1][0] == "canceled" and rest[-1][1]["error"]["type"] == "canceled"
    assert first_step.json()["step"] <= rest[-1][1]["steps_done"] < 150
    deadline = time.monotonic() + 5.0  # one tiny step is milliseconds: the worker is back long before
    while server.client.get("/readyz").json()["workers"][0]["state"] != "ready":
        assert time.monotonic() < deadline, "the worker is still busy with the canceled image"
        time.sleep(0.02)
    assert server.client.get(location + "/images/0.png").status_code == 404  # nothing half-written was stored
    assert server.generate(seed=1)["images"][0]["seed"] == 1


def test_a_streaming_client_that_goes_away_cancels_its_job(server):
    body = {"prompt": "a cat", "steps": 150, "response_format": "url"}
    with connect_sse(server.client, "POST", "/v1/generations", json=body) as source:
        location = source.response.headers["content-location"]
        next(e for e in source.iter_sse() if e.event == "step")
    # the connection is closed: the job ends as canceled by the disconnect, well before its 150 steps
    deadline = time.monotonic() + 10.0
    while (status := server.client.get(location).json())["state"] != "canceled":
        assert status["state"] == "running" and time.monotonic() < deadline, status
        time.sleep(0.02)
    assert status["error"]["type"] == "client_disconnected" and status["steps_done"] < 150
