"""Golden checks per worker: plans the reference images, judges them against baselines, keeps states."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from app.metrics import Metrics
from app.provenance.golden import Baseline, BaselineStore, GoldenCase, GoldenSuite, summarize
from app.registry import Registry
from app.worker.messages import ImageRendered, RenderImage

log = logging.getLogger("app.consistency")


@dataclass(frozen=True)
class CaseResult:
    """One golden case on one worker: expected vs actual hashes and the verdict."""

    case: str
    model: str
    reproducibility_key: str | None
    state: str
    expected_latent_sha256: str | None
    actual_latent_sha256: str | None
    expected_pixel_sha256: str | None
    actual_pixel_sha256: str | None
    error: str | None = None


@dataclass
class WorkerConsistency:
    """What the last golden check of one worker found."""

    worker_id: str
    state: str = "unchecked"
    last_check: str | None = None
    checks_run: int = 0
    mismatches: int = 0
    cases: list[CaseResult] = field(default_factory=list)


@dataclass
class GoldenRun:
    """One run of the suite on one worker: the images to render and what came back."""

    id: str
    worker_id: str
    items: list[tuple[GoldenCase, str]]  # (case, model id) per image index
    messages: list[RenderImage]
    results: dict[int, ImageRendered] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    sent: int = 0

    @property
    def complete(self) -> bool:
        """True when every image has a result or an error."""
        return len(self.results) + len(self.errors) == len(self.items)


class ConsistencyMonitor:
    """Plans golden runs, judges them against the baseline store, and tracks each worker's state."""

    def __init__(
        self, *, suite: GoldenSuite, store: BaselineStore, registry: Registry, metrics: Metrics, interval_s: float,
        quarantine_on_drift: bool,
    ) -> None:
        self.suite = suite
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.quarantine_on_drift = quarantine_on_drift
        self.workers: dict[str, WorkerConsistency] = {}
        metrics.consistency_interval.set(interval_s)

    def worker(self, worker_id: str) -> WorkerConsistency:
        """The record of one worker (created unchecked)."""
        if worker_id not in self.workers:
            self.workers[worker_id] = WorkerConsistency(worker_id)
            self.metrics.set_consistency_state(worker_id, "unchecked")
        return self.workers[worker_id]

    def plan(self, run_id: str, worker_id: str, loaded_models: list[str]) -> GoldenRun:
        """The images of one suite run: every case of each loaded model's family."""
        items: list[tuple[GoldenCase, str]] = []
        messages: list[RenderImage] = []
        for model_id in sorted(loaded_models):
            entry = self.registry.get(model_id)
            if entry is None:
                continue
            for case in self.suite.for_family(entry.family):
                width, height = case.size(entry.defaults.width, entry.defaults.height, entry.limits.size_multiple)
                messages.append(
                    RenderImage(
                        job_id=run_id,
                        index=len(items),
                        model=model_id,
                        prompt=case.prompt,
                        negative_prompt=case.negative_prompt,
                        seed=case.seed,
                        steps=case.steps,
                        guidance_scale=case.guidance_scale,
                        width=width,
                        height=height,
                        sampler=case.sampler,
                    )
                )
                items.append((case, model_id))
        return GoldenRun(id=run_id, worker_id=worker_id, items=items, messages=messages)

    def record(self, run: GoldenRun, checked_at: str) -> WorkerConsistency:
        """Judge a complete run; a case with no baseline under its key records one."""
        record = self.worker(run.worker_id)
        cases: list[CaseResult] = []
        for index, (case, model_id) in enumerate(run.items):
            result = run.results.get(index)
            if result is None:
                cases.append(
                    CaseResult(case.name, model_id, None, "drifted", None, None, None, None, run.errors.get(index))
                )
                continue
            key = result.runtime["reproducibility_key"]
            actual = Baseline(
                case=case.name,
                suite_version=self.suite.version,
                model=model_id,
                reproducibility_key=key,
                latent_sha256=result.latent_sha256,
                pixel_sha256=result.pixel_sha256,
                recorded_at=checked_at,
                recorded_by=run.worker_id,
            )
            verdict = self.store.judge(actual)
            expected = verdict.expected or actual
            cases.append(
                CaseResult(
                    case.name, model_id, key, verdict.state, expected.latent_sha256, actual.latent_sha256,
                    expected.pixel_sha256, actual.pixel_sha256,
                )
            )
        mismatches = sum(1 for c in cases if c.state == "drifted")
        record.state = summarize([c.state for c in cases]) if cases else "unchecked"
        record.last_check, record.cases = checked_at, cases
        record.checks_run += 1
        record.mismatches += mismatches
        self.metrics.consistency_checks.labels(worker=run.worker_id).inc()
        self.metrics.consistency_last_check.labels(worker=run.worker_id).set_to_current_time()
        if mismatches:
            self.metrics.consistency_mismatches.labels(worker=run.worker_id).inc(mismatches)
            log.warning("worker %s drifted on %d golden cases", run.worker_id, mismatches)
        self.metrics.set_consistency_state(run.worker_id, record.state)
        return record

    def report(self, workers: list[Any]) -> dict[str, Any]:
        """GET /v1/consistency: overall status and, per worker, its state, key, last check and cases."""
        rows = []
        for handle in workers:
            record = self.worker(handle.id)
            rows.append(
                {
                    "id": handle.id,
                    "state": record.state,
                    "worker_state": handle.state.value,
                    "reproducibility_keys": {m: info.get("reproducibility_key") for m, info in handle.models.items()},
                    "last_check": record.last_check,
                    "checks_run": record.checks_run,
                    "mismatches": record.mismatches,
                    "cases": [vars(case) for case in record.cases],
                }
            )
        return {
            "status": summarize([row["state"] for row in rows]),
            "suite_version": self.suite.version,
            "interval_s": self.interval_s,
            "quarantine_on_drift": self.quarantine_on_drift,
            "workers": rows,
        }
