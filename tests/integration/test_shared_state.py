"""Shared state: baselines kept in the ledger (both backends), the database setting, per-node job recovery."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.provenance.golden import Baseline, BaselineDocument, BaselineStore
from app.services.jobs import JobService
from app.settings import Settings
from app.store.archive import Archive
from app.store.baselines import LedgerBaselineStore, baseline_store
from app.store.ledger import JobRow, JobState, LedgerError, SqliteLedger
from app.store.postgres import PostgresLedger

KEY = "rk1-" + "a" * 64


def actual(pixel: str = "c", case: str = "pndm-default") -> Baseline:
    return Baseline(
        case=case, suite_version=1, model="sameseed-tiny", reproducibility_key=KEY,
        latent_sha256="b" * 64, pixel_sha256=pixel * 64, recorded_at="2026-11-22T00:00:00Z", recorded_by="w0",
    )


@pytest.fixture(params=("sqlite", "postgresql"))
def ledgers(request, tmp_path):
    """Open ledgers on one store: a new handle per call (as each server of a shared ledger has its own)."""
    opened = []

    def open_():
        if request.param == "sqlite":
            handle = SqliteLedger(tmp_path / "ledger.sqlite3")
        else:
            handle = PostgresLedger(request.getfixturevalue("postgres_url"))
        handle.migrate()
        opened.append(handle)
        return handle

    yield open_
    for handle in opened:
        handle.close()


def test_the_first_hashes_become_the_baseline_and_later_ones_are_judged(ledgers):
    store = LedgerBaselineStore(ledgers())
    assert store.judge(actual()).state == "baseline_recorded"
    assert store.judge(actual()).state == "consistent"
    verdict = store.judge(actual(pixel="d"))
    assert verdict.state == "drifted" and verdict.expected == actual()
    assert store.get("pndm-default", 1, KEY) == actual()


def test_a_baseline_recorded_by_one_server_judges_another(ledgers):
    first, second = LedgerBaselineStore(ledgers()), LedgerBaselineStore(ledgers())
    assert first.judge(actual()).state == "baseline_recorded"
    assert second.judge(actual(pixel="d")).state == "drifted"  # the other server's worker drifted from it
    assert second.export() == first.export() == BaselineDocument(baselines=[actual()])


def test_imported_baselines_replace_or_merge_for_every_server(ledgers):
    first, second = LedgerBaselineStore(ledgers()), LedgerBaselineStore(ledgers())
    first.judge(actual(case="a"))
    assert second.import_(BaselineDocument(baselines=[actual(case="b")])) == 1
    assert [b.case for b in first.export().baselines] == ["a", "b"]
    second.import_(BaselineDocument(baselines=[actual(case="c", pixel="e")]), replace=True)
    assert first.export().baselines == [actual(case="c", pixel="e")]


def test_a_ledger_that_cannot_be_written_still_gives_a_verdict(ledgers):
    ledger = ledgers()
    store = LedgerBaselineStore(ledger)
    ledger.close()  # every write now fails
    assert store.judge(actual()).state == "baseline_recorded"
    assert store.judge(actual()).state == "consistent"  # kept in memory
    assert store.judge(actual(pixel="d")).state == "drifted"


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **values)


def test_the_database_url_must_be_postgresql_and_errors_never_show_it(tmp_path):
    with pytest.raises(ValidationError) as caught:
        settings(tmp_path, database_url="mysql://app:s3cret-pw@db/app")
    assert "postgresql://" in str(caught.value) and "s3cret-pw" not in str(caught.value)
    chosen = settings(tmp_path, database_url="postgresql://app:s3cret-pw@db:5432/app")
    assert "s3cret-pw" not in repr(chosen) and "s3cret-pw" not in str(chosen.model_dump())
    assert settings(tmp_path, database_url="  ").database_url is None


def test_the_node_name_is_the_setting_else_host_and_port(tmp_path):
    assert settings(tmp_path, port=8123).node_name() == f"{socket.gethostname()}:8123"
    assert settings(tmp_path, node_id="gpu-a").node_name() == "gpu-a"


def test_a_database_that_cannot_be_reached_stops_the_start_naming_it_without_the_password(tmp_path):
    from app.cli.pgcluster import free_port

    url = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/app?connect_timeout=2"
    with pytest.raises(LedgerError) as caught:
        Archive(settings(tmp_path, database_url=url))
    assert f"postgresql://app@127.0.0.1:{url.split(':')[3].split('/')[0]}/app" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert not (tmp_path / "data" / "ledger.sqlite3").exists()  # no fallback to a file ledger


def test_baselines_live_in_the_ledger_only_when_it_is_shared(tmp_path, postgres_url):
    local = settings(tmp_path)
    assert isinstance(baseline_store(local, Archive(local)), BaselineStore)
    shared = settings(tmp_path, database_url=postgres_url)
    archive = Archive(shared)
    try:
        assert isinstance(baseline_store(shared, archive), LedgerBaselineStore)
        assert archive.ledger.describe().startswith("postgresql://sameseed@127.0.0.1:")
    finally:
        archive.ledger.close()


def job(n: int, node: str) -> JobRow:
    params = (
        '{"model": "sameseed-tiny", "prompt": "a", "negative_prompt": "", "seed": 1, "steps": 20, '
        '"guidance_scale": 7.5, "width": 64, "height": 64, "sampler": "pndm", "num_images": 1}'
    )
    return JobRow(
        id=f"gen_{n:032x}", state=JobState.RUNNING, params=params, response_format="b64_png",
        received_at=f"2026-01-01T00:00:0{n}.000000Z", updated_at="2026-01-01T00:00:00.000000Z", node=node,
    )


def test_a_restarted_server_of_a_shared_ledger_recovers_only_its_own_jobs(postgres_url):
    ledger = PostgresLedger(postgres_url)
    ledger.migrate()
    ledger.insert_job(job(1, "a:8000"))
    ledger.insert_job(job(2, "b:8000"))  # still running on server b
    try:
        assert JobService(generations=None, ledger=ledger, present=None, node="a:8000")._recover() == 1
        assert ledger.get_job(job(1, "").id).state is JobState.FAILED
        assert ledger.get_job(job(2, "").id).state is JobState.RUNNING
    finally:
        ledger.close()


def test_a_file_ledger_recovers_every_unfinished_job_whatever_its_node(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.migrate()
    ledger.insert_job(job(1, "old-host:8000"))  # the same server, restarted under another name
    try:
        assert JobService(generations=None, ledger=ledger, present=None, node="new-host:9000")._recover() == 1
        assert ledger.get_job(job(1, "").id).state is JobState.FAILED
    finally:
        ledger.close()


def test_readiness_sees_a_database_that_stopped_answering(tmp_path, postgres_cluster):
    import psycopg

    from app.store.health import StorageHealth
    from tests.support.postgres import fresh_database_url

    url = fresh_database_url(postgres_cluster)
    ledger = PostgresLedger(url)
    ledger.migrate()
    health = StorageHealth([tmp_path], ping=ledger.ping)
    try:
        assert health.probe() is None
        with psycopg.connect(postgres_cluster.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")  # its connections are cut too
        problem = health.probe()
        assert problem is not None and problem.startswith("ledger: the PostgreSQL ledger postgresql://sameseed@")
        assert "does not answer" in problem
    finally:
        ledger.close()


def test_a_server_whose_database_goes_away_answers_503_and_reads_not_ready(tmp_path, postgres_cluster):
    import psycopg
    from fastapi.testclient import TestClient

    from tests.support.fakes import answering_app
    from tests.support.postgres import fresh_database_url

    url = fresh_database_url(postgres_cluster)
    application = answering_app(settings(tmp_path, workers="cpu:1", database_url=url, database_timeout_s=0.5))
    with TestClient(application, raise_server_exceptions=False) as client:
        made = client.post("/v1/generations", json={"prompt": "a", "seed": 1})
        assert made.status_code == 200 and client.get(f"/v1/generations/{made.json()['id']}").status_code == 200
        with psycopg.connect(postgres_cluster.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
        for response in (
            client.get(f"/v1/generations/{made.json()['id']}"),
            client.get("/v1/generations"),
            client.post("/v1/generations", json={"prompt": "a", "seed": 2}),
        ):
            assert response.status_code == 503 and response.json()["error"]["type"] == "storage_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["storage"]["error"].startswith("ledger: ")
        assert ready.json()["storage"]["ledger"] == "postgresql"


def test_storage_probes_of_servers_sharing_a_data_dir_use_their_own_file(tmp_path):
    from app.store.health import StorageHealth

    first, second = StorageHealth([tmp_path]), StorageHealth([tmp_path])
    assert first._probe_name != second._probe_name and str(os.getpid()) in first._probe_name
    assert first.probe() is None and second.probe() is None and list(tmp_path.iterdir()) == []


def test_the_ledger_bench_counts_only_committed_generations(tmp_path, postgres_url):
    from app.cli.ledgerbench import measure
    from app.store.ledger import GenerationQuery

    ledgers = (("sqlite", SqliteLedger(tmp_path / "l.sqlite3")), ("postgresql", PostgresLedger(postgres_url)))
    for backend, ledger in ledgers:
        ledger.migrate()
        try:
            rate = measure(ledger, backend, 2, 0.05)
            assert rate.generations > 0 and rate.per_second > 0
            assert len(ledger.find(GenerationQuery(), limit=100_000)) == rate.generations
        finally:
            ledger.close()
