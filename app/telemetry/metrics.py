"""Prometheus metrics of one server: one registry per app, fed by the dispatcher."""

from __future__ import annotations

import platform
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
CONSISTENCY_STATES = ("consistent", "baseline_recorded", "drifted", "unchecked")
WORKER_STATES = ("starting", "checking", "ready", "busy", "restarting", "failed", "quarantined", "stopped")
# Error types exported at 0 from the start: increase() in the alert rules then sees the very first one.
ALERTED_ERRORS = ("queue_full", "storage_unavailable")


class Metrics:
    """Every series the service exports; each app owns its own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sameseed_queue_depth", "Requests admitted and not yet started", registry=r)
        self.queue_limit = Gauge("sameseed_queue_limit", "Waiting requests beyond which new ones get 429", registry=r)
        self.images_pending = Gauge("sameseed_images_pending", "Images waiting for a worker", registry=r)
        self.jobs = Counter("sameseed_jobs", "Generation requests by outcome", ["outcome"], registry=r)
        self.images = Counter("sameseed_images", "Images generated", ["model"], registry=r)
        self.queue_wait = Histogram(
            "sameseed_queue_wait_seconds", "Admission to first image started", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.generation = Histogram(
            "sameseed_generation_seconds", "One image inside a worker", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "sameseed_request_seconds", "Admission to answer, successful requests", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.worker_state = Gauge(
            "sameseed_worker_state", "1 for the state each worker is in", ["worker", "state"], registry=r
        )
        self.worker_keys = Gauge(
            "sameseed_worker_key_info", "1 for each model a worker has loaded, with its reproducibility key",
            ["worker", "model", "reproducibility_key"], registry=r,
        )
        self.worker_busy = Counter(
            "sameseed_worker_busy_seconds", "Seconds each worker spent generating", ["worker"], registry=r
        )
        self.worker_jobs = Counter("sameseed_worker_images", "Images each worker generated", ["worker"], registry=r)
        self.worker_restarts = Counter("sameseed_worker_restarts", "Worker process restarts", ["worker"], registry=r)
        self.retries = Counter("sameseed_image_retries", "Images retried after their worker died", registry=r)
        self.vae_upcasts = Counter(
            "sameseed_vae_upcasts", "Images whose decode gave NaN/Inf and was redone in fp32", ["model"], registry=r
        )
        self.cobatched = Counter(
            "sameseed_cobatched_images", "Images generated in a co-batched pipeline call (bitwise their single runs)",
            ["model"], registry=r,
        )
        self.cobatch_proven = Gauge(
            "sameseed_cobatch_proven",
            "1 where a worker proved a co-batched call bitwise equal to single runs for (model, shape, batch size) "
            "and co-batches it; 0 where it runs singles, `reason` saying why",
            ["worker", "model", "shape", "guided", "batch_size", "reason"], registry=r,
        )
        self.errors = Counter(
            "sameseed_errors", "Service errors answered (SameseedError), by the error body's type", ["type"], registry=r
        )
        for error_type in ALERTED_ERRORS:
            self.errors.labels(type=error_type)

        self.consistency_state = Gauge(
            "sameseed_consistency_state",
            "1 for each worker's golden-check state (consistent, baseline_recorded, drifted, unchecked)",
            ["worker", "state"],
            registry=r,
        )
        self.consistency_checks = Counter(
            "sameseed_consistency_checks", "Golden-suite runs completed", ["worker"], registry=r
        )
        self.consistency_mismatches = Counter(
            "sameseed_consistency_mismatches", "Golden cases whose hashes differed from the baseline", ["worker"],
            registry=r,
        )
        self.consistency_last_check = Gauge(
            "sameseed_consistency_last_check_timestamp_seconds", "Unix time each worker's last golden run finished",
            ["worker"], registry=r,
        )
        self.consistency_interval = Gauge(
            "sameseed_consistency_interval_seconds", "Seconds between golden runs per worker; 0: only at start",
            registry=r,
        )

        # --- operability (issue 17): process health, build identity, HTTP latency
        disable_created_metrics()  # `_created` series double the output and no dashboard reads them
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Info("sameseed_build", "The running Sameseed build", registry=r)
        self.http_duration = Histogram(
            "sameseed_http_request_duration_seconds",
            "HTTP requests by route template, method and status, from first byte in to last byte out",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries.inc(0)

    def describe_build(self, version: str, **fields: str) -> None:
        """Set `sameseed_build_info` (version, python and any other identity fields)."""
        self.build_info.info({"version": version, "python": platform.python_version(), **fields})

    def zero_counters(self, *, workers: Iterable[str], models: Iterable[str], outcomes: Iterable[str]) -> None:
        """Create every known label set at 0, so `increase()` sees the first restart, upcast or mismatch."""
        for worker in workers:
            for counter in (
                self.worker_restarts, self.worker_busy, self.worker_jobs, self.consistency_checks,
                self.consistency_mismatches,
            ):
                counter.labels(worker=worker)
        for model in models:
            self.images.labels(model=model)
            self.vae_upcasts.labels(model=model)
            self.cobatched.labels(model=model)
        for outcome in outcomes:
            self.jobs.labels(outcome=outcome)

    def set_consistency_state(self, worker: str, state: str) -> None:
        """Mark `state` as the one golden-check state of `worker`."""
        for name in CONSISTENCY_STATES:
            self.consistency_state.labels(worker=worker, state=name).set(1 if name == state else 0)

    def set_worker_state(self, worker: str, state: str) -> None:
        """Mark `state` as the one current state of `worker` (and export its restart count from 0)."""
        for name in WORKER_STATES:
            self.worker_state.labels(worker=worker, state=name).set(1 if name == state else 0)
        self.worker_restarts.labels(worker=worker)  # present at 0, so increase() sees the first restart

    def set_cobatch_proofs(self, proofs: dict[str, list[dict]]) -> None:
        """Export worker -> its co-batching verdicts as the whole set (a restarted worker proves again)."""
        self.cobatch_proven.clear()
        for worker, verdicts in proofs.items():
            for v in verdicts:
                shape = f"{v.get('width')}x{v.get('height')}" if v.get("width") else "default"
                self.cobatch_proven.labels(
                    worker=worker, model=v.get("model", ""), shape=shape, guided=str(bool(v.get("guided"))).lower(),
                    batch_size=str(v.get("size")),
                    reason=v.get("reason") or "",
                ).set(1 if v.get("proven") else 0)

    def set_worker_keys(self, keys: dict[str, dict[str, str | None]]) -> None:
        """Export worker -> {model: reproducibility key} as the whole set (a reloaded worker drops its old key)."""
        self.worker_keys.clear()
        for worker, models in keys.items():
            for model, key in models.items():
                self.worker_keys.labels(worker=worker, model=model, reproducibility_key=key or "").set(1)
