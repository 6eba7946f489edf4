"""The ledger: rows of every stored generation, image, job and (shared) golden baseline. The only SQL.

One interface (`Ledger`: every query, written once) over two backends: `SqliteLedger` (the
default: one file, WAL) here, and `PostgresLedger` (app/store/postgres.py, when
SAMESEED_DATABASE_URL is set, shared by several servers). Both commit each write before it
returns, durably (SQLite `synchronous=FULL`; PostgreSQL `synchronous_commit=on`), so a row a
client was answered for survives SIGKILL. Both apply the same versioned migrations on start.

SQLite: one connection per thread (sqlite3 connections must not be shared across threads
mid-use); writes are short `BEGIN IMMEDIATE` transactions. The schema is versioned by
`PRAGMA user_version`.
"""

from __future__ import annotations

import abc
import enum
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic.dataclasses import dataclass as pydantic_dataclass

from app.params import STRICT, ImageHashes

# Append only: a migration, once released, never changes. Index i brings the schema to version i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE generations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        received_at TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        stored_at TEXT NOT NULL,
        model TEXT NOT NULL,
        reproducibility_key TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('stored', 'pruned')),
        pruned_at TEXT,
        key_id TEXT,
        num_images INTEGER NOT NULL,
        manifest TEXT NOT NULL
    );
    CREATE INDEX generations_model ON generations (model, seq);
    CREATE INDEX generations_key ON generations (reproducibility_key, seq);
    CREATE INDEX generations_received ON generations (received_at);
    CREATE INDEX generations_status ON generations (status, seq);
    CREATE TABLE images (
        generation_id TEXT NOT NULL REFERENCES generations (id),
        idx INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        latent_sha256 TEXT NOT NULL,
        pixel_sha256 TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        path TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (generation_id, idx)
    ) WITHOUT ROWID;
    CREATE INDEX images_latent ON images (latent_sha256);
    CREATE INDEX images_pixel ON images (pixel_sha256);
    """,
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        owner TEXT,
        params TEXT NOT NULL,
        reproducibility_key TEXT,
        response_format TEXT NOT NULL,
        received_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        images_done INTEGER NOT NULL DEFAULT 0,
        steps_done INTEGER NOT NULL DEFAULT 0,
        error TEXT
    ) WITHOUT ROWID;
    CREATE INDEX jobs_state ON jobs (state);
    """,
    """
    CREATE TABLE baselines (
        case_name TEXT NOT NULL,
        suite_version INTEGER NOT NULL,
        reproducibility_key TEXT NOT NULL,
        model TEXT NOT NULL,
        latent_sha256 TEXT NOT NULL,
        pixel_sha256 TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        recorded_by TEXT NOT NULL,
        PRIMARY KEY (case_name, suite_version, reproducibility_key)
    ) WITHOUT ROWID;
    ALTER TABLE jobs ADD COLUMN node TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_GENERATION_COLUMNS = (
    "seq, id, received_at, started_at, finished_at, stored_at, model, reproducibility_key, "
    "status, pruned_at, key_id, num_images, manifest"
)
_IMAGE_COLUMNS = "generation_id, idx, seed, latent_sha256, pixel_sha256, width, height, path, bytes"


class LedgerError(RuntimeError):
    """The ledger cannot be used (newer schema, corrupt file, unreachable database, a failed write)."""


class LedgerUnavailable(LedgerError):
    """A write did not commit (disk full, read-only file, lost database connection): nothing was recorded."""


class DuplicateRecord(LedgerError):
    """A write was refused because its id (or key) is already recorded."""


class GenerationStatus(enum.StrEnum):
    """Whether a generation's image files are still on disk."""

    STORED = "stored"
    PRUNED = "pruned"


@pydantic_dataclass(frozen=True, config=STRICT)
class ImageRow(ImageHashes):
    """One image of a generation as the ledger keeps it: its hashes, and its file."""

    generation_id: str
    path: str
    bytes: int


@dataclass(frozen=True)
class GenerationRow:
    """One generation as the ledger keeps it; `manifest` is the signed manifest's canonical JSON."""

    id: str
    received_at: str
    started_at: str
    finished_at: str
    stored_at: str
    model: str
    reproducibility_key: str
    num_images: int
    manifest: str
    key_id: str | None = None
    status: GenerationStatus = GenerationStatus.STORED
    pruned_at: str | None = None
    seq: int | None = None
    images: tuple[ImageRow, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class GenerationQuery:
    """Filters of a ledger listing; every given filter must match. Times compare as ISO 8601 UTC text."""

    model: str | None = None
    reproducibility_key: str | None = None
    latent_sha256: str | None = None
    pixel_sha256: str | None = None
    received_from: str | None = None  # inclusive
    received_before: str | None = None  # exclusive
    status: GenerationStatus | None = None


class JobState(enum.StrEnum):
    """Where an asynchronous job is; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class JobRow:
    """One asynchronous job as the ledger keeps it: enough to answer its status after a restart.

    `params` is the JSON of the effective GenerationParams; `error` the JSON error body of a
    failed or canceled job; `owner` the sha256 (hex) of the API key that submitted it, if any.
    """

    id: str
    state: JobState
    params: str
    response_format: str
    received_at: str
    updated_at: str
    owner: str | None = None
    reproducibility_key: str | None = None
    images_done: int = 0
    steps_done: int = 0
    error: str | None = None
    node: str | None = None  # the server that accepted it (SAMESEED_NODE_ID): a shared ledger recovers per node


_JOB_COLUMNS = (
    "id, state, params, response_format, received_at, updated_at, owner, reproducibility_key, "
    "images_done, steps_done, error, node"
)


@dataclass(frozen=True)
class BaselineRow:
    """Expected hashes of one golden case under one reproducibility key, as the ledger keeps them."""

    case: str
    suite_version: int
    reproducibility_key: str
    model: str
    latent_sha256: str
    pixel_sha256: str
    recorded_at: str
    recorded_by: str = ""


_BASELINE_COLUMNS = (
    "case_name, suite_version, reproducibility_key, model, latent_sha256, pixel_sha256, recorded_at, recorded_by"
)
_BASELINE_INSERT = f"INSERT INTO baselines ({_BASELINE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class Cursor(Protocol):
    """What a backend's execute returns: rows as tuples."""

    rowcount: int

    def fetchone(self) -> Any:  # noqa: ANN401 - a driver's row tuple
        """The next row, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""

    def __iter__(self) -> Iterator[Any]: ...


class Session(Protocol):
    """A backend connection as the shared queries use it: `?` placeholders, rows as tuples."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        """Run one statement."""

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> Any:  # noqa: ANN401 - the driver's own
        """Run one statement once per row."""


class Ledger(abc.ABC):
    """The ledger interface: every query, written once in SQL both backends run; thread-safe.

    A backend provides `_begin` (a write transaction, committed durably on exit), `_reader` (a
    session for reads), `migrate`, `close` and its driver's error classes.
    """

    backend: ClassVar[str]
    shared: ClassVar[bool] = False  # True: several servers may use this ledger at once
    _driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    _duplicate_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    @abc.abstractmethod
    def _begin(self) -> AbstractContextManager[Session]:
        """A write transaction: committed (durably) when the block ends, rolled back when it raises."""

    @abc.abstractmethod
    def _open_reader(self) -> AbstractContextManager[Session]:
        """A session for reads."""

    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection (call once no thread uses the ledger any more)."""

    def check(self) -> None:  # noqa: B027 - a file needs no check; a database server overrides it
        """Raise LedgerError when the ledger cannot be reached now (a start-up check; files: nothing to do)."""

    def ping(self) -> None:  # noqa: B027 - a file ledger is probed with its folder; a database server overrides it
        """Raise LedgerError when the ledger cannot take a query now (for /readyz; answers within seconds)."""

    def describe(self) -> str:
        """Where the rows live, for logs and /readyz: never a password."""
        return self.backend

    @contextmanager
    def _write(self) -> Iterator[Session]:
        # Driver errors become ledger errors, so callers catch one family whatever the backend.
        try:
            with self._begin() as session:
                yield session
        except self._duplicate_errors as exc:
            raise DuplicateRecord(str(exc)) from exc
        except self._driver_errors as exc:
            raise LedgerUnavailable(str(exc)) from exc

    @contextmanager
    def _reader(self) -> Iterator[Session]:
        try:
            with self._open_reader() as session:
                yield session
        except self._driver_errors as exc:  # a lost database connection: a 503, not a bug
            raise LedgerUnavailable(str(exc)) from exc

    # ------------------------------------------------------------------ baselines
    def record_baseline(self, baseline: BaselineRow) -> tuple[bool, BaselineRow]:
        """Record a baseline unless one exists under its (case, suite version, key); returns (recorded, the kept one).

        Atomic: of several servers recording the same case at once, one wins and all see its row.
        """
        with self._write() as session:
            inserted = session.execute(
                _BASELINE_INSERT + " ON CONFLICT (case_name, suite_version, reproducibility_key) DO NOTHING",
                _baseline_values(baseline),
            ).rowcount
            kept = session.execute(
                f"SELECT {_BASELINE_COLUMNS} FROM baselines "
                "WHERE case_name = ? AND suite_version = ? AND reproducibility_key = ?",
                (baseline.case, baseline.suite_version, baseline.reproducibility_key),
            ).fetchone()
        return inserted == 1, BaselineRow(*kept)

    def get_baseline(self, case: str, suite_version: int, key: str) -> BaselineRow | None:
        """The baseline of a case under a key, or None."""
        with self._reader() as session:
            row = session.execute(
                f"SELECT {_BASELINE_COLUMNS} FROM baselines "
                "WHERE case_name = ? AND suite_version = ? AND reproducibility_key = ?",
                (case, suite_version, key),
            ).fetchone()
        return None if row is None else BaselineRow(*row)

    def baselines(self) -> list[BaselineRow]:
        """Every baseline, by key, suite version and case."""
        with self._reader() as session:
            rows = session.execute(
                f"SELECT {_BASELINE_COLUMNS} FROM baselines ORDER BY reproducibility_key, suite_version, case_name"
            ).fetchall()
        return [BaselineRow(*row) for row in rows]

    def put_baselines(self, baselines: Sequence[BaselineRow], *, replace: bool = False) -> None:
        """Write baselines over any under the same (case, suite version, key); `replace`: drop all others first."""
        with self._write() as session:
            if replace:
                session.execute("DELETE FROM baselines")
            session.executemany(
                _BASELINE_INSERT + " ON CONFLICT (case_name, suite_version, reproducibility_key) DO UPDATE SET "
                "model = excluded.model, latent_sha256 = excluded.latent_sha256, "
                "pixel_sha256 = excluded.pixel_sha256, recorded_at = excluded.recorded_at, "
                "recorded_by = excluded.recorded_by",
                [_baseline_values(b) for b in baselines],
            )

    # ------------------------------------------------------------------ writes
    def record(self, generation: GenerationRow) -> None:
        """Insert a generation and its images in one transaction (the id must be new)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO generations (id, received_at, started_at, finished_at, stored_at, model, "
                "reproducibility_key, status, pruned_at, key_id, num_images, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    generation.id,
                    generation.received_at,
                    generation.started_at,
                    generation.finished_at,
                    generation.stored_at,
                    generation.model,
                    generation.reproducibility_key,
                    generation.status.value,
                    generation.pruned_at,
                    generation.key_id,
                    generation.num_images,
                    generation.manifest,
                ),
            )
            conn.executemany(
                f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        generation.id,
                        i.index,
                        i.seed,
                        i.latent_sha256,
                        i.pixel_sha256,
                        i.width,
                        i.height,
                        i.path,
                        i.bytes,
                    )
                    for i in generation.images
                ],
            )

    def mark_pruned(self, generation_ids: Sequence[str], at: str) -> None:
        """Mark generations whose image files were deleted; their rows and manifests stay."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE generations SET status = ?, pruned_at = ? WHERE id = ? AND status = ?",
                [(GenerationStatus.PRUNED.value, at, gid, GenerationStatus.STORED.value) for gid in generation_ids],
            )

    def insert_job(self, job: JobRow) -> None:
        """Record a newly accepted job (the id must be new); committed before its 202 is sent."""
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id, job.state.value, job.params, job.response_format, job.received_at, job.updated_at,
                    job.owner, job.reproducibility_key, job.images_done, job.steps_done, job.error, job.node,
                ),
            )

    def update_job(
        self, job_id: str, state: JobState, at: str, *, images_done: int, steps_done: int, error: str | None = None
    ) -> None:
        """Move a job to `state` with its progress; a job already in a final state keeps it."""
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, images_done = ?, steps_done = ?, error = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (state.value, at, images_done, steps_done, error, job_id, *(s.value for s in UNFINISHED)),
            )

    def delete_job(self, job_id: str) -> None:
        """Forget a job that was never accepted (its admission failed)."""
        with self._write() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get_job(self, job_id: str) -> JobRow | None:
        """One job, or None."""
        with self._reader() as session:
            row = session.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def unfinished_jobs(self, node: str | None = None) -> list[JobRow]:
        """Jobs still queued or running (after a restart: those the previous process did not finish).

        `node`: only the jobs that server accepted (a shared ledger: other servers' jobs are still running).
        """
        mine = "AND node = ?" if node is not None else ""
        with self._reader() as session:
            rows = session.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN (?, ?) {mine} ORDER BY received_at, id",
                (*(s.value for s in UNFINISHED), *([node] if node is not None else [])),
            ).fetchall()
        return [self._job(row) for row in rows]

    @staticmethod
    def _job(row: tuple) -> JobRow:
        return JobRow(
            id=row[0], state=JobState(row[1]), params=row[2], response_format=row[3], received_at=row[4],
            updated_at=row[5], owner=row[6], reproducibility_key=row[7], images_done=row[8], steps_done=row[9],
            error=row[10], node=row[11],
        )

    # ------------------------------------------------------------------ reads
    def get(self, generation_id: str) -> GenerationRow | None:
        """One generation with its images, or None."""
        with self._reader() as session:
            row = session.execute(
                f"SELECT {_GENERATION_COLUMNS} FROM generations WHERE id = ?", (generation_id,)
            ).fetchone()
            if row is None:
                return None
            return self._with_images(session, [row])[0]

    def find(self, query: GenerationQuery, *, before_seq: int | None = None, limit: int = 20) -> list[GenerationRow]:
        """Generations matching every filter, newest first, with seq below `before_seq` (the cursor)."""
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (
            ("model", query.model),
            ("reproducibility_key", query.reproducibility_key),
            ("status", query.status.value if query.status else None),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        for column, value in (("latent_sha256", query.latent_sha256), ("pixel_sha256", query.pixel_sha256)):
            if value is not None:
                clauses.append(f"id IN (SELECT generation_id FROM images WHERE {column} = ?)")
                params.append(value)
        if query.received_from is not None:
            clauses.append("received_at >= ?")
            params.append(query.received_from)
        if query.received_before is not None:
            clauses.append("received_at < ?")
            params.append(query.received_before)
        if before_seq is not None:
            clauses.append("seq < ?")
            params.append(before_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reader() as session:
            rows = session.execute(
                f"SELECT {_GENERATION_COLUMNS} FROM generations {where} ORDER BY seq DESC LIMIT ?", (*params, limit)
            ).fetchall()
            return self._with_images(session, rows)

    def oldest_stored(self, limit: int = 500, received_before: str | None = None) -> list[GenerationRow]:
        """The oldest generations whose files are still stored (optionally received before a time), oldest first."""
        age = "AND received_at < ?" if received_before is not None else ""
        params = (GenerationStatus.STORED.value, *([received_before] if received_before is not None else []), limit)
        with self._reader() as session:
            rows = session.execute(
                f"SELECT {_GENERATION_COLUMNS} FROM generations WHERE status = ? {age} ORDER BY seq ASC LIMIT ?", params
            ).fetchall()
            return self._with_images(session, rows)

    def stored_bytes(self) -> int:
        """Total bytes of the image files of generations not pruned."""
        with self._reader() as session:
            (total,) = session.execute(
                "SELECT COALESCE(SUM(i.bytes), 0) FROM images i JOIN generations g ON g.id = i.generation_id "
                "WHERE g.status = ?",
                (GenerationStatus.STORED.value,),
            ).fetchone()
        return int(total)

    def _with_images(self, conn: Session, rows: list[tuple]) -> list[GenerationRow]:
        if not rows:
            return []
        ids = [row[1] for row in rows]
        images: dict[str, list[ImageRow]] = {gid: [] for gid in ids}
        marks = ", ".join("?" for _ in ids)
        for image in conn.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE generation_id IN ({marks}) ORDER BY generation_id, idx", ids
        ):
            gid, index, seed, latent, pixel, width, height, path, size = image
            images[gid].append(
                ImageRow(
                    index=index, seed=seed, latent_sha256=latent, pixel_sha256=pixel, width=width, height=height,
                    generation_id=gid, path=path, bytes=size,
                )
            )
        return [
            GenerationRow(
                seq=row[0],
                id=row[1],
                received_at=row[2],
                started_at=row[3],
                finished_at=row[4],
                stored_at=row[5],
                model=row[6],
                reproducibility_key=row[7],
                status=GenerationStatus(row[8]),
                pruned_at=row[9],
                key_id=row[10],
                num_images=row[11],
                manifest=row[12],
                images=tuple(images[row[1]]),
            )
            for row in rows
        ]


def _baseline_values(b: BaselineRow) -> tuple[object, ...]:
    return (
        b.case, b.suite_version, b.reproducibility_key, b.model, b.latent_sha256, b.pixel_sha256, b.recorded_at,
        b.recorded_by,
    )


class SqliteLedger(Ledger):
    """The SQLite ledger file (the default); thread-safe through one connection per thread."""

    backend = "sqlite"
    _driver_errors = (sqlite3.Error,)
    _duplicate_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise LedgerError("the ledger is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _begin(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger {self.path} has schema version {found}; this server knows up to "
                    f"{SCHEMA_VERSION} (a newer Sameseed wrote it)"
                )
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
        return found

    @contextmanager
    def _open_reader(self) -> Iterator[sqlite3.Connection]:
        yield self._connection()

    def close(self) -> None:
        """Close every connection (call once no thread uses the ledger any more)."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
