"""The ledger on both backends (SQLite, PostgreSQL) and the image store.

Migrations, filters, cursors, threads, pruning marks, jobs, baselines, atomic files. Every test
taking `ledger` or `open_ledger` runs once per backend: PostgreSQL in the session's throwaway
cluster (tests/support/postgres.py), a fresh schema per test.
"""

import dataclasses
import sqlite3
import threading

import psycopg
import pytest

from app.store.files import ImageStore
from app.store.ledger import (
    MIGRATIONS,
    SCHEMA_VERSION,
    BaselineRow,
    DuplicateRecord,
    GenerationQuery,
    GenerationRow,
    GenerationStatus,
    ImageRow,
    JobRow,
    JobState,
    LedgerError,
    SqliteLedger,
)
from app.store.postgres import POSTGRES_MIGRATIONS, PostgresLedger


def row(n, *, model="sameseed-tiny", key="rk1-a", images=1, received=None):
    gid = f"gen_{n:032x}"
    return GenerationRow(
        id=gid,
        received_at=received or f"2026-01-01T00:00:{n:02d}.000000Z",
        started_at="2026-01-01T00:00:00.000000Z",
        finished_at="2026-01-01T00:00:00.000000Z",
        stored_at="2026-01-01T00:00:00.000000Z",
        model=model,
        reproducibility_key=key,
        num_images=images,
        manifest=f'{{"id":"{gid}"}}',
        key_id="k1",
        images=tuple(
            ImageRow(
                index=k, seed=100 + n + k, latent_sha256=f"{n:02d}{k}".ljust(64, "a"),
                pixel_sha256=f"{n:02d}{k}".ljust(64, "b"), width=64, height=64, generation_id=gid, path="p", bytes=10,
            )
            for k in range(images)
        ),
    )


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def open_ledger(request, tmp_path):
    """Open a new handle on this test's ledger (the same file, or the same PostgreSQL schema) each call."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"

        def make():
            return SqliteLedger(path)
    else:
        url = request.getfixturevalue("postgres_url")

        def make():
            return PostgresLedger(url)

    opened = []

    def open_():
        opened.append(make())
        return opened[-1]

    open_.backend = request.param
    yield open_
    for handle in opened:
        handle.close()


@pytest.fixture()
def ledger(open_ledger):
    ledger = open_ledger()
    ledger.migrate()
    return ledger


def raw(open_ledger, sql):
    """Run one statement on the test's ledger with the backend's own driver; returns the rows."""
    handle = open_ledger()
    if open_ledger.backend == "sqlite":
        with sqlite3.connect(handle.path) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(handle._url, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def test_migrate_creates_the_schema_once(open_ledger):
    ledger = open_ledger()
    assert ledger.migrate() == 0
    assert ledger.migrate() == SCHEMA_VERSION
    assert open_ledger().migrate() == SCHEMA_VERSION  # another server opening the same ledger


def test_sqlite_runs_in_wal_mode(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = SqliteLedger(path)
    ledger.migrate()
    ledger.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_ledger_of_the_previous_version_is_upgraded_keeping_its_rows(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as conn:  # a ledger a release with schema version 2 wrote
        for migration in MIGRATIONS[:2]:
            conn.executescript(migration)
        conn.execute("PRAGMA user_version = 2")
        conn.execute(
            "INSERT INTO jobs (id, state, params, response_format, received_at, updated_at) "
            "VALUES ('gen_1', 'running', '{}', 'b64_png', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')"
        )
    ledger = SqliteLedger(path)
    try:
        assert ledger.migrate() == 2
        assert [(j.id, j.node) for j in ledger.unfinished_jobs()] == [("gen_1", None)]
        assert ledger.record_baseline(baseline())[0] is True
    finally:
        ledger.close()


def test_both_backends_migrate_to_the_same_tables_and_columns(tmp_path, postgres_url):
    assert len(MIGRATIONS) == len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION
    lite = SqliteLedger(tmp_path / "ledger.sqlite3")
    lite.migrate()
    lite.close()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        sqlite_columns = {
            (t, c[1], bool(c[3])) for t in tables if not t.startswith("sqlite_")
            for c in conn.execute(f"PRAGMA table_info({t})")
        }
    pg = PostgresLedger(postgres_url)
    pg.migrate()
    pg.close()
    with psycopg.connect(postgres_url) as conn:
        pg_columns = {
            (t, c, nullable == "NO")
            for t, c, nullable in conn.execute(
                "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name <> 'sameseed_schema'"
            )
        }
    # SQLite reports a primary key's columns as nullable unless declared NOT NULL; compare names, then NOT NULLs
    assert {(t, c) for t, c, _ in sqlite_columns} == {(t, c) for t, c, _ in pg_columns}
    assert {x for x in sqlite_columns if x[2]} <= pg_columns


def test_a_ledger_from_a_newer_server_is_refused(open_ledger):
    open_ledger().migrate()
    if open_ledger.backend == "sqlite":
        raw(open_ledger, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        raw(open_ledger, f"UPDATE sameseed_schema SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer"):
        open_ledger().migrate()


def test_record_and_get_round_trip_and_survive_reopening(open_ledger, ledger):
    ledger.record(row(1, images=2))
    ledger.close()
    got = open_ledger().get(row(1).id)
    assert got == dataclasses.replace(row(1, images=2), seq=got.seq)
    assert [i.index for i in got.images] == [0, 1] and got.status is GenerationStatus.STORED


def test_ids_are_unique(ledger):
    ledger.record(row(1))
    with pytest.raises(DuplicateRecord):
        ledger.record(row(1))
    assert ledger.get(row(1).id) is not None and ledger.get("gen_missing") is None
    assert len(ledger.find(GenerationQuery())) == 1  # the refused write left nothing behind


def test_filters_each_narrow_the_listing(ledger):
    ledger.record(row(1, model="m1", key="rk1-a"))
    ledger.record(row(2, model="m2", key="rk1-a", images=2))
    ledger.record(row(3, model="m1", key="rk1-b"))

    def ids(**filters):
        return [int(r.id[4:], 16) for r in ledger.find(GenerationQuery(**filters))]

    assert ids() == [3, 2, 1]
    assert ids(model="m1") == [3, 1]
    assert ids(reproducibility_key="rk1-a") == [2, 1]
    assert ids(model="m1", reproducibility_key="rk1-a") == [1]
    assert ids(latent_sha256=row(2, images=2).images[1].latent_sha256) == [2]
    assert ids(pixel_sha256=row(3).images[0].pixel_sha256) == [3]
    assert ids(pixel_sha256="c" * 64) == []
    assert ids(received_from="2026-01-01T00:00:02.000000Z") == [3, 2]
    assert ids(received_before="2026-01-01T00:00:02.000000Z") == [1]
    ledger.mark_pruned([row(2).id], "2026-02-01T00:00:00.000000Z")
    assert ids(status=GenerationStatus.PRUNED) == [2]


def test_cursor_pages_walk_every_row_once_newest_first(ledger):
    for n in range(1, 8):
        ledger.record(row(n))
    seen, before = [], None
    while page := ledger.find(GenerationQuery(), before_seq=before, limit=3):
        seen += [int(r.id[4:], 16) for r in page]
        before = page[-1].seq
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_pruned_rows_keep_their_manifest_and_leave_the_stored_total(ledger):
    ledger.record(row(1, images=2))
    ledger.record(row(2))
    assert ledger.stored_bytes() == 30
    ledger.mark_pruned([row(1).id], "2026-02-01T00:00:00.000000Z")
    pruned = ledger.get(row(1).id)
    assert pruned.status is GenerationStatus.PRUNED and pruned.pruned_at.startswith("2026-02-01")
    assert pruned.manifest == row(1).manifest and len(pruned.images) == 2
    assert ledger.stored_bytes() == 10
    assert [r.id for r in ledger.oldest_stored()] == [row(2).id]
    assert ledger.oldest_stored(received_before="2026-01-01T00:00:02.000000Z") == []


def test_threads_write_concurrently_through_their_own_connections(ledger):
    errors = []

    def write(start):
        try:
            for n in range(start, start + 20):
                ledger.record(row(n))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(1 + 20 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.find(GenerationQuery(), limit=1000)) == 80


def test_a_row_written_through_one_server_is_read_through_another(open_ledger, ledger):
    other = open_ledger()  # a second handle: another server on the same ledger
    ledger.record(row(5, images=2))
    got = other.get(row(5).id)
    assert got is not None and [i.pixel_sha256 for i in got.images] == [i.pixel_sha256 for i in row(5, images=2).images]


def job(n, *, node=None, state=JobState.QUEUED):
    return JobRow(
        id=f"gen_{n:032x}", state=state, params="{}", response_format="b64_png",
        received_at=f"2026-01-01T00:00:{n:02d}.000000Z", updated_at="2026-01-01T00:00:00.000000Z", node=node,
    )


def test_jobs_keep_their_state_and_node_and_recover_per_node(ledger):
    ledger.insert_job(job(1, node="a:8000"))
    ledger.insert_job(job(2, node="b:8000"))
    ledger.insert_job(job(3, node="a:8000"))
    ledger.update_job(job(3).id, JobState.SUCCEEDED, "2026-01-01T00:01:00.000000Z", images_done=1, steps_done=20)
    ledger.update_job(job(3).id, JobState.FAILED, "2026-01-01T00:02:00.000000Z", images_done=0, steps_done=0)
    assert ledger.get_job(job(3).id).state is JobState.SUCCEEDED  # a final state stays
    assert [j.id for j in ledger.unfinished_jobs()] == [job(1).id, job(2).id]
    assert [j.id for j in ledger.unfinished_jobs(node="a:8000")] == [job(1).id]
    assert ledger.get_job(job(2).id).node == "b:8000"
    ledger.delete_job(job(1).id)
    assert ledger.get_job(job(1).id) is None


def baseline(case="pndm-default", key="rk1-" + "a" * 64, pixel="c"):
    return BaselineRow(
        case=case, suite_version=1, reproducibility_key=key, model="sameseed-tiny", latent_sha256="b" * 64,
        pixel_sha256=pixel * 64, recorded_at="2026-11-22T00:00:00Z", recorded_by="w0",
    )


def test_the_first_baseline_recorded_under_a_key_is_kept(ledger):
    assert ledger.record_baseline(baseline()) == (True, baseline())
    assert ledger.record_baseline(baseline(pixel="d")) == (False, baseline())
    assert ledger.get_baseline("pndm-default", 1, baseline().reproducibility_key) == baseline()
    assert ledger.get_baseline("pndm-default", 2, baseline().reproducibility_key) is None


def test_servers_racing_to_record_one_baseline_all_see_the_one_that_won(open_ledger, ledger):
    handles = [open_ledger() for _ in range(4)]
    results, barrier = [], threading.Barrier(len(handles))

    def race(handle, pixel):
        barrier.wait()
        results.append(handle.record_baseline(baseline(pixel=pixel)))

    threads = [threading.Thread(target=race, args=(h, p)) for h, p in zip(handles, "cdef", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(recorded for recorded, _ in results) == 1
    assert len({kept for _, kept in results}) == 1


def test_baselines_import_merges_or_replaces(ledger):
    ledger.put_baselines([baseline("a"), baseline("b")])
    ledger.put_baselines([baseline("b", pixel="d")])
    assert [(b.case, b.pixel_sha256[0]) for b in ledger.baselines()] == [("a", "c"), ("b", "d")]
    ledger.put_baselines([baseline("z")], replace=True)
    assert [b.case for b in ledger.baselines()] == ["z"]


def test_an_unreachable_database_is_a_clear_error_that_never_shows_the_password():
    from app.cli.pgcluster import free_port

    url = f"postgresql://sameseed:hunter2secret@127.0.0.1:{free_port()}/sameseed"
    ledger = PostgresLedger(url, connect_timeout_s=2)
    with pytest.raises(LedgerError) as caught:
        ledger.check()
    message = str(caught.value)
    assert "postgresql://sameseed@127.0.0.1" in message and "hunter2secret" not in message
    assert ledger.describe() == url.replace(":hunter2secret", "")


def test_postgres_sessions_commit_synchronously_even_when_the_server_default_is_off(postgres_url):
    ledger = PostgresLedger(postgres_url + "%20-csynchronous_commit%3Doff")  # as a tuned postgresql.conf might say
    try:
        with ledger._reader() as session:
            assert session.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        ledger.close()


def test_image_store_writes_complete_files_and_refuses_odd_ids(tmp_path):
    store = ImageStore(tmp_path / "images")
    gid = "gen_" + "ab" * 16
    paths = store.write_generation(gid, b'{"id": 1}', [b"png0", b"png1"])
    assert [p.read_bytes() for p in paths] == [b"png0", b"png1"]
    folder = store.folder(gid)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "manifest.json"]  # no temp files left
    assert store.resolve(store.relative(paths[1])) == paths[1]
    assert store.delete_images(gid) == 8
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    for bad in ("../etc", "gen_../../x", "gen_ZZ"):
        with pytest.raises(ValueError):
            store.folder(bad)
