"""Golden checks: submits the reference images as work, judges them against baselines, owns quarantine.

A golden run is an ordinary work item of priority CHECK pinned to one worker; the monitor
starts one when a worker becomes ready, on a timer, and on demand, and decides which drifted
workers the pool keeps out of user work.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.models.registry import Registry
from app.params import CaseResult, GenerationParams
from app.provenance.golden import Baseline, Baselines, GoldenCase, GoldenSuite, summarize
from app.scheduler.dispatcher import Dispatcher
from app.scheduler.work import Priority, Work, WorkState
from app.telemetry.metrics import Metrics
from app.timestamps import utc_now
from app.worker.messages import WorkerReady
from app.worker.pool import COMING, SERVING, WorkerEvent, WorkerExited, WorkerHandle, WorkerState

log = logging.getLogger("app.services.consistency")


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
    """One run of the suite on one worker: (case, model id) per image index, and its work item."""

    worker_id: str
    items: list[tuple[GoldenCase, str]]
    work: Work
    verdict: asyncio.Future[WorkerConsistency | None]


class ConsistencyMonitor:
    """Plans golden runs, judges them against the baseline store, and tracks each worker's state."""

    def __init__(
        self, *, suite: GoldenSuite, store: Baselines, registry: Registry, metrics: Metrics, interval_s: float,
        quarantine_on_drift: bool, require_consistency: bool = False,
    ) -> None:
        self.suite = suite
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.quarantine_on_drift = quarantine_on_drift
        self.require_consistency = require_consistency  # hold a started worker out of user work until it passes
        self.workers: dict[str, WorkerConsistency] = {}
        metrics.consistency_interval.set(interval_s)
        self.dispatcher: Dispatcher | None = None
        self._runs: dict[str, GoldenRun] = {}  # in flight, by worker id
        self._periodic: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, dispatcher: Dispatcher) -> None:
        """Check every worker through this dispatcher as it becomes ready; re-judge quarantine on exits."""
        self.dispatcher = dispatcher
        dispatcher.subscribe(self._on_worker_event)

    def _on_worker_event(self, worker: WorkerHandle, event: WorkerEvent) -> None:
        if isinstance(event, WorkerReady):
            self._start_check_holding(worker)
        elif isinstance(event, WorkerExited):
            self.apply_quarantine()  # a peer that is gone for good no longer vouches for its group

    def _start_check_holding(self, worker: WorkerHandle) -> None:
        """A worker's start-up check; with `require_consistency` the pool holds it out of user work meanwhile."""
        assert self.dispatcher is not None
        if self.require_consistency:
            self.dispatcher.pool.set_held(worker.id, True)  # before the check is queued: no user image slips in
        if self.start_check(worker) is None and worker.held:
            log.info("worker %s has no golden case to check; taking user work", worker.id)
            self.dispatcher.pool.set_held(worker.id, False)

    def start_periodic(self) -> None:
        """Every `interval_s`, queue a golden run on each worker (0 turns it off)."""
        if self.interval_s <= 0 or self._periodic is not None or self.dispatcher is None:
            return

        async def every() -> None:
            assert self.dispatcher is not None
            while True:
                await asyncio.sleep(self.interval_s)
                for worker in self.dispatcher.workers():
                    self.start_check(worker)

        self._periodic = asyncio.get_running_loop().create_task(every())

    def stop(self) -> None:
        """Stop the periodic checks."""
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None

    # ------------------------------------------------------------------ runs
    def start_check(self, worker: WorkerHandle) -> asyncio.Future[WorkerConsistency | None] | None:
        """Queue a golden run on this worker (ahead of user work); its verdict future, or None when moot."""
        if self.dispatcher is None or worker.state not in (*SERVING, WorkerState.QUARANTINED, WorkerState.CHECKING):
            return None
        running = self._runs.get(worker.id)
        if running is not None:
            return running.verdict
        items, images = self.plan(list(worker.models))
        if not items:
            return None
        run = GoldenRun(
            worker_id=worker.id,
            items=items,
            work=Work(
                id=f"golden_{uuid.uuid4().hex}",
                images=tuple(images),
                priority=Priority.CHECK,
                worker_id=worker.id,
                all_or_nothing=False,
                retries=0,
                solo=frozenset(i for i, (case, _) in enumerate(items) if case.cobatch == 1),
                on_done=lambda work: self._judge(worker.id, work),
            ),
            verdict=asyncio.get_running_loop().create_future(),
        )
        self._runs[worker.id] = run
        log.info("golden check queued on %s (%d images)", worker.id, len(items))
        self.dispatcher.submit(run.work)
        return run.verdict

    async def run_checks(self, timeout_s: float) -> None:
        """Run the golden suite on every serving or quarantined worker now and wait for the verdicts."""
        assert self.dispatcher is not None
        futures = [f for w in self.dispatcher.workers() if (f := self.start_check(w)) is not None]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)

    def _judge(self, worker_id: str, work: Work) -> None:
        run = self._runs.pop(worker_id, None)
        if run is None or run.work is not work:
            return
        # a run cut short (its worker exited) has no verdict: a fresh one runs when the worker is back
        record = self.record(run, utc_now()) if work.state is WorkState.SUCCEEDED else None
        if not run.verdict.done():
            run.verdict.set_result(record)
        if record is not None:
            self._release_if_passed(worker_id, record)
            self.apply_quarantine()

    def _release_if_passed(self, worker_id: str, record: WorkerConsistency) -> None:
        """A held worker whose check is consistent (or recorded its baseline) takes user work from now on."""
        assert self.dispatcher is not None
        handle = self.dispatcher.pool.workers.get(worker_id)
        if handle is None or not handle.held:
            return
        if record.state in ("consistent", "baseline_recorded"):
            log.info("worker %s passed its golden check (%s); taking user work", worker_id, record.state)
            self.dispatcher.pool.set_held(worker_id, False)
        else:  # stays out until a re-run passes (POST /v1/consistency/run) or baselines are imported
            log.error("worker %s failed its golden check (%s); held out of user work", worker_id, record.state)

    def checking(self) -> list[str]:
        """Workers held out of user work until their golden check passes."""
        if self.dispatcher is None:
            return []
        return [w.id for w in self.dispatcher.workers() if w.held]

    def apply_quarantine(self) -> None:
        """Quarantine exactly the drifted workers that have a consistent, serving peer in their group."""
        if self.dispatcher is None:
            return
        workers = self.dispatcher.workers()
        states = {w.id: self.worker(w.id).state for w in workers}
        healthy_groups = {  # a consistent peer that is restarting still counts: it serves again soon
            w.group_key for w in workers
            if states[w.id] in ("consistent", "baseline_recorded") and w.state in (*SERVING, *COMING)
        }
        for worker in workers:
            should = self.quarantine_on_drift and states[worker.id] == "drifted" and worker.group_key in healthy_groups
            if should and not worker.quarantined:
                log.warning("worker %s quarantined: drifted while a peer of its group is consistent", worker.id)
                self.dispatcher.pool.set_quarantined(worker.id, True)
            elif not should and worker.quarantined:
                log.info("worker %s back in rotation", worker.id)
                self.dispatcher.pool.set_quarantined(worker.id, False)

    def worker(self, worker_id: str) -> WorkerConsistency:
        """The record of one worker (created unchecked)."""
        if worker_id not in self.workers:
            self.workers[worker_id] = WorkerConsistency(worker_id)
            self.metrics.set_consistency_state(worker_id, "unchecked")
        return self.workers[worker_id]

    def plan(self, loaded_models: list[str]) -> tuple[list[tuple[GoldenCase, str]], list[GenerationParams]]:
        """The images of one suite run: every case of each loaded model's family, with its parameters."""
        items: list[tuple[GoldenCase, str]] = []
        images: list[GenerationParams] = []
        for model_id in sorted(loaded_models):
            entry = self.registry.get(model_id)
            if entry is None:
                continue
            for case in self.suite.for_family(entry.family):
                width, height = case.size(entry.defaults.width, entry.defaults.height, entry.limits.size_multiple)
                for k in range(case.cobatch):  # a co-batched case's companions follow it: seed + 1, ...
                    images.append(
                        GenerationParams(
                            model=model_id,
                            prompt=case.prompt,
                            negative_prompt=case.negative_prompt,
                            seed=case.seed + k,
                            steps=case.steps,
                            guidance_scale=case.guidance_scale,
                            width=width,
                            height=height,
                            sampler=case.sampler,
                            num_images=1,
                        )
                    )
                    items.append((case, model_id))
        return items, images

    def record(self, run: GoldenRun, checked_at: str) -> WorkerConsistency:
        """Judge a complete run; a case with no baseline under its key records one."""
        record = self.worker(run.worker_id)
        cases: list[CaseResult] = []
        for index, (case, model_id) in enumerate(run.items):
            if run.work.images[index].seed != case.seed:
                continue  # a co-batched case's companion: only there to share the call
            result = run.work.results.get(index)
            if result is None:
                error = run.work.errors.get(index)
                cases.append(
                    CaseResult(
                        case.name, model_id, None, "drifted", None, None, None, None,
                        f"{error.type}: {error.message}" if error else "failed",
                    )
                )
                continue
            key = result.runtime["reproducibility_key"]
            actual = Baseline(
                case=case.cobatch_of or case.name,  # a co-batched case must give its single-run twin's hashes
                suite_version=self.suite.version,
                model=model_id,
                reproducibility_key=key,
                latent_sha256=result.image.latent_sha256,
                pixel_sha256=result.image.pixel_sha256,
                recorded_at=checked_at,
                recorded_by=run.worker_id,
            )
            verdict = self.store.judge(actual)
            expected = verdict.expected or actual
            cases.append(
                CaseResult(
                    case.name, model_id, key, verdict.state, expected.latent_sha256, actual.latent_sha256,
                    expected.pixel_sha256, actual.pixel_sha256,
                    cobatched_with=result.image.cobatched_with if case.cobatch > 1 else None,
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
