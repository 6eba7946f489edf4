"""The PostgreSQL ledger backend (SAMESEED_DATABASE_URL): one ledger shared by several Sameseed servers.

The queries are the ledger interface's own (app/store/ledger.py); this module adds connections (a
psycopg 3 pool), the schema in PostgreSQL's dialect, and durability: every session runs with
`synchronous_commit = on`, so a commit has reached the server's WAL on disk before the write
returns, whatever the server's default. Migrations run in one transaction under an advisory lock,
so servers starting together apply each version once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from app.store.ledger import MIGRATIONS, SCHEMA_VERSION, Cursor, Ledger, LedgerError, LedgerUnavailable

log = logging.getLogger("app.store.postgres")

# Append only, one entry per entry of ledger.MIGRATIONS (same version numbers, same tables and columns).
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE generations (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        received_at TEXT COLLATE "C" NOT NULL,
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
        seed BIGINT NOT NULL,
        latent_sha256 TEXT NOT NULL,
        pixel_sha256 TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        path TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        PRIMARY KEY (generation_id, idx)
    );
    CREATE INDEX images_latent ON images (latent_sha256);
    CREATE INDEX images_pixel ON images (pixel_sha256)
    """,
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        owner TEXT,
        params TEXT NOT NULL,
        reproducibility_key TEXT,
        response_format TEXT NOT NULL,
        received_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT NOT NULL,
        images_done INTEGER NOT NULL DEFAULT 0,
        steps_done INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX jobs_state ON jobs (state)
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
    );
    ALTER TABLE jobs ADD COLUMN node TEXT
    """,
)
assert len(POSTGRES_MIGRATIONS) == len(MIGRATIONS) == SCHEMA_VERSION

MIGRATION_LOCK = 0x5A3E5EED  # pg_advisory_xact_lock key: one migrating server at a time
POOL_MAX = 16  # connections per server: more than its threads that touch the ledger at once


def redacted(url: str) -> str:
    """A connection URL without its password (and other options): `postgresql://user@host:port/dbname`."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class _Session:
    """A psycopg connection seen through the shared queries' `?` placeholders (they hold no `%` or literal `?`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self._conn.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[return-value,arg-type]

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), [tuple(row) for row in rows])  # type: ignore[arg-type]


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database; thread-safe through a connection pool."""

    backend = "postgresql"
    shared = True
    _driver_errors = (psycopg.Error, psycopg_pool.PoolTimeout)
    _duplicate_errors = (psycopg.errors.UniqueViolation,)

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0, pool_max: int = POOL_MAX) -> None:
        self._url = url
        self.connect_timeout_s = connect_timeout_s
        self.pool_max = pool_max
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._closed = False
        self._lock = threading.Lock()

    def describe(self) -> str:
        """`postgresql://user@host:port/dbname` (no password)."""
        return redacted(self._url)

    def _unreachable(self, exc: BaseException) -> LedgerError:
        reason = str(exc).replace(conninfo_to_dict(self._url).get("password") or "\0", "***")
        return LedgerError(f"cannot use the PostgreSQL ledger {self.describe()}: {reason.strip()}")

    def check(self) -> None:
        """Connect once and run `SELECT 1`; LedgerError naming the database (never its password) otherwise."""
        try:
            with psycopg.connect(self._url, connect_timeout=max(1, round(self.connect_timeout_s))) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None

    def ping(self, timeout_s: float = 2.0) -> None:
        """Run `SELECT 1` on a pooled connection within `timeout_s`; LedgerUnavailable otherwise (for /readyz)."""
        try:
            with self._connections().connection(timeout=min(timeout_s, self.connect_timeout_s)) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise LedgerUnavailable(f"the PostgreSQL ledger {self.describe()} does not answer: {exc}") from None

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        # Durability: a commit returns only once it is on the server's disk, whatever postgresql.conf says.
        conn.execute("SET synchronous_commit = on")

    def _connections(self) -> psycopg_pool.ConnectionPool[Any]:
        with self._lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            if self._pool is None:
                self._pool = self._open_pool()
            return self._pool

    def _open_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pool = psycopg_pool.ConnectionPool(
            self._url,
            min_size=1,
            max_size=self.pool_max,
            kwargs={
                "autocommit": True,
                "application_name": "sameseed",
                "connect_timeout": max(1, round(self.connect_timeout_s)),
            },
            configure=self._configure,
            check=psycopg_pool.ConnectionPool.check_connection,  # a server restart costs one reconnect
            timeout=self.connect_timeout_s,
            open=False,
            name="sameseed-ledger",
        )
        try:
            pool.open(wait=True, timeout=self.connect_timeout_s)
        except psycopg_pool.PoolTimeout as exc:
            pool.close()
            raise self._unreachable(exc) from None
        return pool

    @contextmanager
    def _begin(self) -> Iterator[_Session]:
        with self._connections().connection() as conn, conn.transaction():
            yield _Session(conn)

    @contextmanager
    def _open_reader(self) -> Iterator[_Session]:
        with self._connections().connection() as conn:
            yield _Session(conn)

    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION in one transaction; returns the version found before."""
        with self._write() as session:
            session.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            session.execute("CREATE TABLE IF NOT EXISTS sameseed_schema (version INTEGER NOT NULL)")
            row = session.execute("SELECT version FROM sameseed_schema").fetchone()
            if row is None:
                session.execute("INSERT INTO sameseed_schema (version) VALUES (0)")
            found = 0 if row is None else int(row[0])
            if found > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger {self.describe()} has schema version {found}; this server knows up to "
                    f"{SCHEMA_VERSION} (a newer Sameseed wrote it)"
                )
            for version in range(found, SCHEMA_VERSION):
                for statement in POSTGRES_MIGRATIONS[version].split(";"):
                    if statement.strip():
                        session.execute(statement)
                session.execute("UPDATE sameseed_schema SET version = ?", (version + 1,))
            fsync = session.execute("SHOW fsync").fetchone()[0]
        if fsync != "on":
            log.warning("the PostgreSQL server runs with fsync=%s: a power cut may lose committed rows", fsync)
        return found

    def close(self) -> None:
        """Close the pool (call once no thread uses the ledger any more)."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None
