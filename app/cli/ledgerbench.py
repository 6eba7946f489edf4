"""`python -m app.cli.ledgerbench` (run by `make bench`): the ledger's write rate on SQLite and PostgreSQL.

It times the service's own insert path, `Ledger.record` (a generation row, its image rows and its
manifest, committed durably before a 200 is answered), one commit per generation as a request
makes it, from 1 thread and from several at once (concurrent requests, or several servers on one
PostgreSQL ledger). PostgreSQL runs in a throwaway local cluster (fsync and synchronous_commit on),
SQLite in a temporary folder of the same disk. An asynchronous job adds three small commits
(accepted, running, final state) to its generation's one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from app.cli.pgcluster import ThrowawayCluster
from app.store.ledger import GenerationRow, ImageRow, Ledger, SqliteLedger

MODEL_FILES = 36  # a manifest lists every model file's sha256: with them, this one is about 4 KB, as real ones


@dataclass(frozen=True)
class WriteRate:
    """Generations recorded per second by one backend with `threads` writers (one commit each)."""

    backend: str
    threads: int
    generations: int
    seconds: float

    @property
    def per_second(self) -> float:
        """Committed generations per second."""
        return self.generations / self.seconds


def generation(images: int = 1) -> GenerationRow:
    """A generation row as the archive writes it, with a new id."""
    gid = "gen_" + secrets.token_hex(16)
    return GenerationRow(
        id=gid,
        received_at="2026-11-27T00:00:00.000000Z",
        started_at="2026-11-27T00:00:00.100000Z",
        finished_at="2026-11-27T00:00:00.400000Z",
        stored_at="2026-11-27T00:00:00.410000Z",
        model="sameseed-tiny",
        reproducibility_key="rk1-" + "a" * 64,
        num_images=images,
        manifest=json.dumps({  # as incompressible as a real one: mostly hex digests
            "id": gid,
            "model": {"files": {f"unet/part-{n}.safetensors": secrets.token_hex(32) for n in range(MODEL_FILES)}},
            "images": [{"latent_sha256": secrets.token_hex(32), "pixel_sha256": secrets.token_hex(32)}],
            "signature": {"value": secrets.token_hex(64)},
        }, sort_keys=True, separators=(",", ":")),
        key_id="0123456789abcdef",
        images=tuple(
            ImageRow(
                index=k, seed=1234 + k, latent_sha256=secrets.token_hex(32), pixel_sha256=secrets.token_hex(32),
                width=512, height=512, generation_id=gid, path=f"{gid[4:6]}/{gid}/{k}.png", bytes=400_000,
            )
            for k in range(images)
        ),
    )


def measure(ledger: Ledger, backend: str, threads: int, seconds: float) -> WriteRate:
    """Record generations from `threads` threads for about `seconds`; the committed rate."""
    counts = [0] * threads
    stop = time.monotonic() + seconds
    start_line = threading.Barrier(threads + 1)

    def write(slot: int) -> None:
        start_line.wait()
        while time.monotonic() < stop:
            ledger.record(generation())
            counts[slot] += 1

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start_line.wait()
    began = time.monotonic()
    for worker in workers:
        worker.join()
    return WriteRate(backend, threads, sum(counts), time.monotonic() - began)


def run_ledger_bench(*, seconds: float = 3.0, threads: tuple[int, ...] = (1, 8)) -> list[WriteRate]:
    """Measure both backends, print a table and what 100 images/s needs; returns the rates."""
    rates: list[WriteRate] = []
    backends: list[tuple[str, Callable[[Path], Ledger]]] = [("sqlite", lambda d: SqliteLedger(d / "ledger.sqlite3"))]
    with tempfile.TemporaryDirectory(prefix="sameseed-ledgerbench-") as tmp, ThrowawayCluster() as cluster:
        from app.store.postgres import PostgresLedger

        backends.append(("postgresql", lambda _d: PostgresLedger(cluster.url())))
        for backend, make in backends:
            ledger = make(Path(tmp))
            ledger.migrate()
            try:
                measure(ledger, backend, 1, 0.3)  # warm up: connections, caches
                rates += [measure(ledger, backend, n, seconds) for n in threads]
            finally:
                ledger.close()
        bytes_per_row = _postgres_bytes_per_generation(cluster.url())
    size = len(generation().manifest)
    print(f"ledger write rate (Ledger.record: 1 generation + 1 image row, {size} B manifest, 1 durable commit each)")
    for rate in rates:
        print(f"  {rate.backend:<10} {rate.threads:>2} writer(s)  {rate.per_second:>8.0f} generations/s"
              f"  ({1000 * rate.seconds / max(rate.generations, 1) * rate.threads:.2f} ms per commit)")
    print(f"  postgresql on disk: {bytes_per_row / 1024:.1f} KiB per generation (tables, TOAST, indexes)")
    print("  100 images/s of 1-image requests = 100 commits/s (async jobs: 400 commits/s, 3 of them tiny), "
          f"{100 * 86400 * bytes_per_row / 1e9:.0f} GB of ledger a day")
    return rates


def _postgres_bytes_per_generation(url: str) -> float:
    """Bytes the generations and images tables (with TOAST and indexes) hold per generation."""
    import psycopg

    with psycopg.connect(url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM generations").fetchone()
        (size,) = conn.execute(
            "SELECT pg_total_relation_size('generations') + pg_total_relation_size('images')"
        ).fetchone()
    return size / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    """Command line: `--seconds`, `--out FILE` (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, help="write the rates as JSON")
    args = parser.parse_args(argv)
    rates = run_ledger_bench(seconds=args.seconds)
    if args.out is not None:
        args.out.write_text(json.dumps([{**asdict(r), "per_second": r.per_second} for r in rates], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
