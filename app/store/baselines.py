"""Golden baselines kept in the ledger: with a PostgreSQL ledger, every server shares one set.

The same contract as the file store (app/provenance/golden.BaselineStore): `get`, `judge` (the
first hashes seen under a key become its baseline), `export`, `import_`. Recording is atomic in the
database, so of two servers checking the same key at once one records and the other is judged
against it. A failed write keeps the verdict, with the baseline in memory until a write works, as
the file store does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from app.provenance.golden import Baseline, BaselineDocument, Baselines, BaselineStore, CaseVerdict
from app.settings import Settings
from app.store.archive import Archive
from app.store.ledger import BaselineRow, Ledger, LedgerError

log = logging.getLogger("app.store.baselines")

BASELINES_FILE = Path("consistency") / "baselines.json"


def _row(b: Baseline) -> BaselineRow:
    return BaselineRow(
        case=b.case, suite_version=b.suite_version, reproducibility_key=b.reproducibility_key, model=b.model,
        latent_sha256=b.latent_sha256, pixel_sha256=b.pixel_sha256, recorded_at=b.recorded_at,
        recorded_by=b.recorded_by,
    )


def _baseline(r: BaselineRow) -> Baseline:
    return Baseline(
        case=r.case, suite_version=r.suite_version, reproducibility_key=r.reproducibility_key, model=r.model,
        latent_sha256=r.latent_sha256, pixel_sha256=r.pixel_sha256, recorded_at=r.recorded_at,
        recorded_by=r.recorded_by,
    )


class LedgerBaselineStore:
    """Baselines in the ledger's `baselines` table; thread-safe."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        self._unwritten: dict[tuple[str, int, str], Baseline] = {}  # recorded while the ledger could not be written

    def get(self, case: str, suite_version: int, key: str) -> Baseline | None:
        """The baseline of a case under a key, if recorded."""
        with self._lock:
            pending = self._unwritten.get((case, suite_version, key))
        if pending is not None:
            return pending
        row = self.ledger.get_baseline(case, suite_version, key)
        return None if row is None else _baseline(row)

    def judge(self, actual: Baseline) -> CaseVerdict:
        """Compare actual hashes with the baseline; record them as the baseline when there is none (atomically)."""
        key = (actual.case, actual.suite_version, actual.reproducibility_key)
        with self._lock:
            expected = self._unwritten.get(key)
        if expected is None:
            try:
                recorded, kept = self.ledger.record_baseline(_row(actual))
            except LedgerError as exc:  # the verdict stands; the baseline is kept in memory until a write works
                log.error("cannot write a golden baseline to the ledger %s: %s", self.ledger.describe(), exc)
                with self._lock:
                    self._unwritten[key] = actual
                return CaseVerdict("baseline_recorded", None)
            if recorded:
                return CaseVerdict("baseline_recorded", None)
            expected = _baseline(kept)
        same = (expected.latent_sha256, expected.pixel_sha256) == (actual.latent_sha256, actual.pixel_sha256)
        return CaseVerdict("consistent" if same else "drifted", expected)

    def export(self) -> BaselineDocument:
        """Every baseline, sorted."""
        return BaselineDocument(baselines=[_baseline(row) for row in self.ledger.baselines()])

    def import_(self, document: BaselineDocument, *, replace: bool = False) -> int:
        """Merge (or replace all with) imported baselines in one transaction; returns how many were written."""
        self.ledger.put_baselines([_row(b) for b in document.baselines], replace=replace)
        with self._lock:
            self._unwritten.clear()
        return len(document.baselines)


def baseline_store(settings: Settings, archive: Archive) -> Baselines:
    """Where this server keeps baselines: the shared ledger (PostgreSQL), else `consistency/baselines.json`."""
    if archive.ledger.shared:
        return LedgerBaselineStore(archive.ledger)
    return BaselineStore(settings.data_dir / BASELINES_FILE)
