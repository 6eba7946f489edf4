"""`python -m app soak` (`make soak`, not in CI): mixed requests at concurrency against cpu:2 while workers are killed.

It reports what an operator cares about after a long run: requests lost (no HTTP answer), 5xx
answers, latency percentiles of generations, and the resident memory growth of the server's
process tree after warm-up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.cli.server_process import ServerProcess, process_stats

SAMPLERS = ("pndm", "euler", "euler_a", "ddim", "dpmpp_2m")


@dataclass
class SoakReport:
    """The figures of one soak run."""

    requests: int
    concurrency: int
    workers_killed: int
    lost: int
    server_errors: int
    statuses: dict[str, int]
    generation_p50_s: float
    generation_p99_s: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_growth_mb: float
    wall_s: float
    params: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The report as aligned text lines."""
        rows = [
            ("requests (concurrency)", f"{self.requests} ({self.concurrency})"),
            ("workers killed", str(self.workers_killed)),
            ("lost (no HTTP answer)", str(self.lost)),
            ("5xx answers", str(self.server_errors)),
            ("answers by status", ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))),
            ("generation p50 / p99", f"{self.generation_p50_s:.3f} s / {self.generation_p99_s:.3f} s"),
            ("process tree RSS after warm-up", f"{self.rss_after_warmup_mb:.1f} MB"),
            ("process tree RSS at the end", f"{self.rss_end_mb:.1f} MB"),
            ("RSS growth", f"{self.rss_growth_mb:+.1f} MB"),
            ("wall time", f"{self.wall_s:.0f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc), in bytes."""
    children: dict[int, list[int]] = {}
    for child, fields in process_stats():
        children.setdefault(int(fields[1]), []).append(child)
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(current, []))
    return total


class Soak:
    """One soak run: a server, client threads sending mixed requests, and a worker killer."""

    def __init__(self, server: ServerProcess, *, requests: int, concurrency: int, kill_every_s: float) -> None:
        self.server = server
        self.requests = requests
        self.concurrency = concurrency
        self.kill_every_s = kill_every_s
        self.statuses: Counter[str] = Counter()
        self.lost = 0
        self.generation_s: list[float] = []
        self.images: list[str] = []  # urls of stored images, for GET and verify requests
        self.killed = 0
        self._lock = threading.Lock()
        self._done = threading.Event()

    def one(self, number: int, client: httpx.Client) -> None:
        """Send request `number` (its kind drawn from a fixed-seed mix) and record its answer."""
        rng = random.Random(number)
        kind = rng.random()
        began = time.perf_counter()
        try:
            if kind < 0.7 or not self.images:
                body = {
                    "prompt": f"soak {number % 50}",
                    "seed": rng.randrange(1000),
                    "num_images": rng.choice((1, 1, 2)),
                    "sampler": rng.choice(SAMPLERS),
                    "response_format": rng.choice(("b64_png", "url")),
                }
                response = client.post("/v1/generations", json=body)
                if response.status_code == 200:
                    with self._lock:
                        self.generation_s.append(time.perf_counter() - began)
                        self.images.extend(image["url"] for image in response.json()["images"])
            elif kind < 0.8:
                response = client.get(rng.choice(self.images))
            elif kind < 0.85:
                png = client.get(rng.choice(self.images)).content
                response = client.post("/v1/verify", content=png, headers={"content-type": "image/png"})
            elif kind < 0.95:
                response = client.get("/v1/generations", params={"limit": 10})
            else:
                response = client.get(rng.choice(("/readyz", "/metrics", "/v1/models")))
        except httpx.TransportError:
            with self._lock:
                self.lost += 1
            return
        label = str(response.status_code)
        if response.status_code >= 400:  # the error type says why: worker_lost, not_ready, ...
            try:
                label += " " + response.json()["error"]["type"]
            except (ValueError, KeyError, TypeError):
                pass
        with self._lock:
            self.statuses[label] += 1

    def killer(self) -> None:
        """SIGKILL one worker (alternating) every `kill_every_s` until the run ends."""
        turn = 0
        while not self._done.wait(self.kill_every_s):
            workers = [w for w in self.server.client.get("/readyz").json()["workers"] if w["pid"]]
            if not workers:
                continue
            victim = workers[turn % len(workers)]
            turn += 1
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                self.killed += 1
            except ProcessLookupError:
                pass

    def steady_rss(self, deadline_s: float = 120.0) -> int:
        """The process tree's RSS at a moment every worker is loaded (a restarting one would read low)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            workers = self.server.client.get("/readyz").json()["workers"]
            if all(w["state"] in ("ready", "busy") for w in workers):
                break
            time.sleep(0.2)
        return tree_rss_bytes(self.server.process.pid)  # type: ignore[union-attr]

    def run(self) -> SoakReport:
        """Run every request, sampling the process tree's RSS after the first tenth (warm-up) and at the end."""
        assert self.server.process is not None
        began = time.monotonic()
        warm_rss = 0
        warm_at = max(1, self.requests // 10)
        threading.Thread(target=self.killer, daemon=True).start()
        local = threading.local()

        def task(number: int) -> None:
            nonlocal warm_rss
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=self.server.url, timeout=600)
            self.one(number, local.client)
            if number == warm_at:
                warm_rss = self.steady_rss()

        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(task, range(self.requests)))
        self._done.set()
        end_rss = self.steady_rss()
        times = sorted(self.generation_s) or [0.0]
        return SoakReport(
            requests=self.requests,
            concurrency=self.concurrency,
            workers_killed=self.killed,
            lost=self.lost,
            server_errors=sum(n for status, n in self.statuses.items() if status.startswith("5")),
            statuses=dict(self.statuses),
            generation_p50_s=statistics.median(times),
            generation_p99_s=times[min(len(times) - 1, int(len(times) * 0.99))],
            rss_after_warmup_mb=warm_rss / 1e6,
            rss_end_mb=end_rss / 1e6,
            rss_growth_mb=(end_rss - warm_rss) / 1e6,
            wall_s=time.monotonic() - began,
        )


def run_soak(*, requests: int, concurrency: int, kill_every_s: float, out: Path | None) -> SoakReport:
    """Start a cpu:2 server on the tiny model, soak it, stop it, print (and optionally write) the report."""
    with tempfile.TemporaryDirectory(prefix="sameseed-soak-") as tmp:
        server = ServerProcess(Path(tmp) / "data", SAMESEED_WORKERS="cpu:2", SAMESEED_MAX_QUEUE="256").start()
        try:
            report = Soak(server, requests=requests, concurrency=concurrency, kill_every_s=kill_every_s).run()
        finally:
            server.stop()
    report.params = {"workers": "cpu:2", "model": "sameseed-tiny", "kill_every_s": kill_every_s}
    print(report.table())
    if out is not None:
        out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


__all__ = ["SoakReport", "run_soak", "tree_rss_bytes"]
