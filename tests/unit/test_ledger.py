"""The ledger (SQLite) and the image store: migrations, filters, cursors, threads, pruning marks, atomic files."""

import dataclasses
import sqlite3
import threading

import pytest

from app.store.files import ImageStore
from app.store.ledger import (
    SCHEMA_VERSION,
    GenerationQuery,
    GenerationRow,
    GenerationStatus,
    ImageRow,
    Ledger,
    LedgerError,
)


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


@pytest.fixture()
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.migrate()
    yield ledger
    ledger.close()


def test_migrate_creates_the_schema_in_wal_mode_once(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    assert ledger.migrate() == 0
    assert ledger.migrate() == SCHEMA_VERSION
    ledger.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_ledger_from_a_newer_server_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(path).migrate()


def test_record_and_get_round_trip_and_survive_reopening(tmp_path, ledger):
    ledger.record(row(1, images=2))
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.sqlite3")
    got = reopened.get(row(1).id)
    reopened.close()
    assert got == dataclasses.replace(row(1, images=2), seq=got.seq)
    assert [i.index for i in got.images] == [0, 1] and got.status is GenerationStatus.STORED


def test_ids_are_unique(ledger):
    ledger.record(row(1))
    with pytest.raises(sqlite3.IntegrityError):
        ledger.record(row(1))
    assert ledger.get(row(1).id) is not None and ledger.get("gen_missing") is None


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
