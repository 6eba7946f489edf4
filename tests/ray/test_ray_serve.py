"""Sameseed on a local Ray cluster: `serve --ray` with 2 CPU replicas of the tiny model, against a standalone server.

One Ray head (a temporary directory, free loopback ports) and one ingress for the whole module; the
standalone reference is the test process's plain server (`server`, cpu:1 and one thread, as each
replica). The replica-kill test runs last because it restarts a replica.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import threading
import time

import pytest

from app.cli.ray_cluster import LocalRayCluster
from app.cli.server_process import ServerProcess

WORKER_ID = re.compile(r"^\d+\.\d+\.\d+\.\d+/w[01]#\w+$")  # node address / slot # replica


def workers(server):
    return {w["id"]: w for w in server.client.get("/readyz").json()["workers"]}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def until(predicate, deadline_s, what):
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"{what} within {deadline_s}s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    head = LocalRayCluster(num_cpus=2).start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("ray-ingress"), SAMESEED_RAY_ADDRESS=cluster.address,
                           SAMESEED_WORKERS="cpu:2")
    try:
        server.start(deadline_s=240)
        # both replicas loaded and past their start-up golden check
        until(lambda: all(w["state"] == "ready" for w in workers(server).values()), 120, "both replicas ready")
        yield server
    finally:
        try:
            replicas = [w["pid"] for w in workers(server).values()]
        except Exception:  # the ingress never came up: its start error is the one to see
            replicas = []
        assert server.stop() == 0, server.logs()  # SIGTERM: drained, then the slots deleted
    until(lambda: not any(alive(pid) for pid in replicas), 30, "Serve stopped the replicas")


def generate(server, **body):
    response = server.post(**body)
    assert response.status_code == 200, response.text
    return response.json()


def hashes(made):
    return [(i["seed"], i["latent_sha256"], i["pixel_sha256"]) for i in made["images"]]


def test_a_request_through_ray_gives_the_standalone_servers_hashes_with_the_same_key(ray_server, server):
    alone = generate(server, seed=2024, num_images=2, sampler="euler_a")
    key = alone["manifest"]["runtime"]["reproducibility_key"]
    through_ray = generate(ray_server, seed=2024, num_images=2, sampler="euler_a", reproducibility_key=key)
    assert hashes(through_ray) == hashes(alone)
    manifest = through_ray["manifest"]
    assert manifest["runtime"]["reproducibility_key"] == key
    # the only visible difference: worker ids name the node and the replica; the 2 images used both replicas
    image_workers = {image["worker_id"] for image in manifest["images"]}
    assert all(WORKER_ID.match(w) for w in image_workers) and len(image_workers) == 2, image_workers
    assert {w["group_key"] for w in workers(ray_server).values()} == {workers(server)["w0"]["group_key"]}


def test_a_generation_made_on_a_replica_is_fetched_verified_and_replayed_through_the_ingress(ray_server):
    made = generate(ray_server, seed=77, steps=8)
    record = ray_server.client.get(f"/v1/generations/{made['id']}")
    assert record.status_code == 200 and record.json()["manifest"] == made["manifest"]
    png = ray_server.client.get(f"/v1/generations/{made['id']}/images/0.png")
    assert png.content == base64.b64decode(made["images"][0]["png_base64"])
    verified = ray_server.client.post("/v1/verify", content=png.content, headers={"content-type": "image/png"}).json()
    assert verified["valid"] and verified["pixels_match"] and verified["known_to_ledger"], verified
    replayed = ray_server.client.post("/v1/reproduce", json={"generation_id": made["id"]})
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["verdict"] == "identical" and replayed.json()["same_key"] is True


def test_a_replica_killed_mid_job_is_healed_by_serve_and_its_image_retried(ray_server):
    expected = hashes(generate(ray_server, seed=31, num_images=2, steps=40))
    answer: dict = {}
    job = threading.Thread(target=lambda: answer.update(made=generate(ray_server, seed=31, num_images=2, steps=40)))
    job.start()
    until(lambda: any(w["state"] == "busy" for w in workers(ray_server).values()), 30, "a replica busy")
    victim = next(w for w in workers(ray_server).values() if w["state"] == "busy")
    os.kill(victim["pid"], signal.SIGKILL)
    job.join(timeout=120)
    assert hashes(answer["made"]) == expected  # the lost image was rendered again, bit for bit
    # Serve starts a new replica in the slot; it passes its golden check and serves again
    until(lambda: workers(ray_server)[victim["id"]]["state"] == "ready", 120, "the slot healed")
    healed = workers(ray_server)[victim["id"]]
    assert healed["restarts"] == 1 and healed["pid"] != victim["pid"] and "lost" in healed["last_error"]
    metrics = ray_server.client.get("/metrics").text
    assert re.search(r"^sameseed_image_retries_total 1\.0$", metrics, re.MULTILINE), metrics[:2000]
