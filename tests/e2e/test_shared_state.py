"""Two servers, one state: a PostgreSQL ledger, one data dir (images, latents) and one signing key file.

A generation made through server A is fetched, verified and replayed through server B; a 200 from
a server SIGKILLed right after it is in the ledger, and the other server serves its manifest and PNG
(a restart on the same data dir is tests/e2e/test_restarts.py's).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import psycopg
import pytest

from app.cli.pgcluster import free_port
from tests.e2e.conftest import ROOT, Server
from tests.e2e.test_restarts import key_file, running
from tests.support.postgres import fresh_database_url


@pytest.fixture(scope="module")
def shared(postgres_cluster, tmp_path_factory):
    """The shared state of a two-server deployment: database URL, data dir (the NFS mount) and key file."""
    root = tmp_path_factory.mktemp("shared")
    return {
        "SAMESEED_DATABASE_URL": fresh_database_url(postgres_cluster),
        "SAMESEED_DATA_DIR": str(root / "data"),
        "SAMESEED_SIGNING_KEY_FILE": str(key_file(root / "signing-key.pem")),
    }


@pytest.fixture(scope="module")
def servers(shared, tmp_path_factory):
    """Servers A and B on the shared state, started together (each logs into its own folder)."""
    pair = [Server(tmp_path_factory.mktemp(name), **shared) for name in ("a", "b")]
    for srv in pair:
        srv.start(wait_ready=False)
    try:
        for srv in pair:
            srv.wait_ready()
            srv.settle()
        yield pair
    finally:
        for srv in pair:
            srv.stop()


def test_a_generation_made_through_one_server_is_fetched_verified_and_replayed_through_another(servers):
    a, b = servers
    assert a.client.get("/readyz").json()["storage"]["ledger"] == "postgresql"
    made = a.generate(seed=4242, num_images=2)

    record = b.client.get(f"/v1/generations/{made['id']}")
    assert record.status_code == 200 and record.json()["manifest"] == made["manifest"]
    assert made["id"] in [g["id"] for g in b.client.get("/v1/generations").json()["data"]]
    for image in made["images"]:
        png = b.client.get(image["url"])
        assert png.status_code == 200 and png.content == base64.b64decode(image["png_base64"])
        verified = b.client.post("/v1/verify", content=png.content, headers={"content-type": "image/png"}).json()
        assert verified["valid"] and verified["known_to_ledger"], verified
        assert verified["key_id"] == made["manifest"]["signature"]["key_id"]

    replay = b.client.post("/v1/reproduce", json={"generation_id": made["id"]}).json()
    assert replay["verdict"] == "identical" and replay["source"] == "ledger", replay
    assert [i["latent_drift"]["max_abs"] for i in replay["images"]] == [0, 0]  # A's latents, read by B
    assert [i["pixel_match"] and i["latent_match"] for i in replay["images"]] == [True, True]


def test_both_servers_judge_their_workers_against_one_set_of_baselines(servers):
    a, b = servers
    exported = [srv.client.get("/v1/consistency/baselines").json() for srv in servers]
    assert exported[0] == exported[1] and exported[0]["baselines"]
    keys = {baseline["reproducibility_key"] for baseline in exported[0]["baselines"]}
    assert len(keys) == 1  # both workers have the same key: one set of cases, recorded once
    states = [w["consistency"] for srv in (a, b) for w in srv.client.get("/readyz").json()["workers"]]
    assert set(states) <= {"consistent", "baseline_recorded"}
    # every case now has its one baseline, whichever server recorded it: a re-run is judged against them
    assert b.client.post("/v1/consistency/run").json()["status"] == "consistent"
    assert a.client.get("/v1/consistency/baselines").json() == exported[0]  # nothing new was recorded


def test_a_200_survives_sigkill_of_its_server_and_the_other_server_serves_it(servers, shared):
    a, b = servers
    worker_pids = [w["pid"] for w in b.client.get("/readyz").json()["workers"]]
    made = b.generate(seed=777)
    b.process.kill()  # SIGKILL the moment the answer is in
    b.process.wait(timeout=10)
    with psycopg.connect(shared["SAMESEED_DATABASE_URL"]) as conn:
        stored = conn.execute("SELECT manifest FROM generations WHERE id = %s", (made["id"],)).fetchone()
    assert stored is not None
    assert a.client.get(f"/v1/generations/{made['id']}").json()["manifest"] == made["manifest"]

    png = a.client.get(made["images"][0]["url"])
    assert png.status_code == 200 and png.content == base64.b64decode(made["images"][0]["png_base64"])
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in worker_pids):  # the killed server's workers exit by themselves
        assert time.monotonic() < deadline, "orphan workers kept running"
        time.sleep(0.1)


def test_a_database_that_cannot_be_reached_stops_the_start_with_a_clear_error(tmp_path):
    url = f"postgresql://sameseed:s3cret-pw@127.0.0.1:{free_port()}/sameseed"
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "SAMESEED_DATA_DIR": str(tmp_path / "data"), "SAMESEED_WORKERS": "cpu:1",
                          "SAMESEED_DATABASE_URL": url},
    )
    assert done.returncode == 2, done.stderr
    assert "cannot use the PostgreSQL ledger postgresql://sameseed@127.0.0.1" in done.stderr
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert not (tmp_path / "data" / "ledger.sqlite3").exists()
