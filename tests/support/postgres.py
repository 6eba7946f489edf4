"""PostgreSQL for the tests: one throwaway cluster per session, a fresh schema (or database) per test or module."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from app.cli.pgcluster import ThrowawayCluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[ThrowawayCluster]:
    """A PostgreSQL cluster (Debian's `postgresql` package: `make postgresql`) on a free loopback port."""
    with ThrowawayCluster() as cluster:
        yield cluster


def fresh_schema_url(cluster: ThrowawayCluster) -> tuple[str, str]:
    """A new empty schema in the cluster's `postgres` database: (its name, a URL whose search_path is it)."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema, cluster.url(search_path=schema)


def drop_schema(cluster: ThrowawayCluster, schema: str) -> None:
    """Remove a schema made by fresh_schema_url, with everything in it."""
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def fresh_database_url(cluster: ThrowawayCluster) -> str:
    """A new empty database in the cluster (for servers, which own the whole schema)."""
    name = f"db_{secrets.token_hex(6)}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return cluster.url(name)


@pytest.fixture()
def postgres_url(postgres_cluster: ThrowawayCluster) -> Iterator[str]:
    """A URL of a fresh, empty schema (dropped after the test): a ledger of its own for each test."""
    schema, url = fresh_schema_url(postgres_cluster)
    yield url
    drop_schema(postgres_cluster, schema)
