"""What open event streams cost a busy `cpu:2` server (`python -m app bench --only listeners`).

Rounds of `images` asynchronous jobs run with no event stream, with `listeners` **idle** SSE streams
(waiting on a job queued behind the measured ones: they get its queue positions only) and with
`listeners` streams **following** the measured jobs' every event, the three kinds interleaved (ABC,
CBA, ...). The listener clients run in a child process at the lowest CPU priority (SCHED_IDLE, else
nice 19) once their streams are open, so they only use CPU the server leaves idle, as clients on
other machines would. The measuring client (submissions, a poll of the last job, two sweeps of every
job's steps) is the same in every kind.

Each round counts one window: from every stream open (no stream: the last submission) to the last
measured job leaving the queue, so every listener is connected, and both workers busy, throughout.
Work done in it is counted in denoising steps (images' worth: steps / steps per image), read from
the jobs' status at both ends, so an image half done when the window opens counts as half.
Over the window the bench also reads the server's CPU seconds (user + system, /proc/PID/stat) of
its HTTP process and of its workers (the HTTP process's descendants): CPU time is far less noisy
than wall time on a shared machine. The machine's busy time (/proc/stat) less the server's and the
bench's own gives the CPU other processes took meanwhile: the wall-clock figures mean something
only when that is small.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from app.cli.server_process import ServerProcess, process_stats, stat_fields

NONE, IDLE, FOLLOWING = "none", "idle", "following"
KINDS = (NONE, IDLE, FOLLOWING)
TARGET_SLOWDOWN = 0.03  # the goal for idle listeners
POLL_S = 0.25  # the measuring client's poll of the last job (light: 4 requests a second); sweeps time the window
CHILD_TIMEOUT_S = 180.0  # the listener process: start-up and opening its streams
CHILD_DRAIN_S = 30.0  # after the round: the listener process reads the rest, else it is ended


# ---------------------------------------------------------------------- CPU accounting (/proc)
@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user + system) used so far: the server's HTTP process, its workers together, the bench's own
    processes (measuring client, listener clients), and the whole machine (every core, steal included)."""

    http_s: float
    workers_s: float
    bench_s: float = 0.0
    machine_s: float = 0.0

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        return CpuSample(self.http_s - earlier.http_s, self.workers_s - earlier.workers_s,
                         self.bench_s - earlier.bench_s, self.machine_s - earlier.machine_s)

    @property
    def others_s(self) -> float:
        """What neither the server nor the bench used: other people's processes, and the hypervisor's steal."""
        return self.machine_s - self.http_s - self.workers_s - self.bench_s


def cpu_seconds(fields: Sequence[str], ticks_per_s: int) -> float:
    """utime + stime of one process, in seconds, from its /proc/PID/stat fields after "pid (comm) "."""
    return (int(fields[11]) + int(fields[12])) / ticks_per_s  # stat(5) fields 14 and 15


def machine_busy_seconds(proc_stat: str, ticks_per_s: int) -> float:
    """Busy CPU seconds of every core together from /proc/stat's first line: all but idle and iowait."""
    name, *ticks = proc_stat.split("\n", 1)[0].split()
    if name != "cpu":
        raise ValueError(f"not /proc/stat's summary line: {name!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
    return (user + nice + system + irq + softirq + steal) / ticks_per_s  # guest time is inside user already


def descendants(stats: Iterable[tuple[int, Sequence[str]]], root: int) -> list[int]:
    """Every process below `root` (its children, theirs, ...) among (pid, stat fields) pairs, sorted."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats:
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return sorted(found)


def read_stat(pid: int) -> list[str]:
    """The /proc/PID/stat fields after "pid (comm) " of one live process (Linux)."""
    return stat_fields(Path(f"/proc/{pid}/stat").read_text())


def read_machine() -> str:
    """/proc/stat (Linux)."""
    return Path("/proc/stat").read_text()


def sample_cpu(
    http_pid: int, worker_pids: Sequence[int], bench_pids: Sequence[int] = (), *,
    read: Callable[[int], Sequence[str]] = read_stat, read_machine: Callable[[], str] = read_machine,
    ticks_per_s: int | None = None,
) -> CpuSample:
    """CPU seconds so far: the server's HTTP process, its worker processes summed, the bench's, the machine's."""
    ticks = ticks_per_s or os.sysconf("SC_CLK_TCK")
    return CpuSample(
        cpu_seconds(read(http_pid), ticks),
        sum(cpu_seconds(read(pid), ticks) for pid in worker_pids),
        sum(cpu_seconds(read(pid), ticks) for pid in bench_pids),
        machine_busy_seconds(read_machine(), ticks),
    )


# ---------------------------------------------------------------------- figures
@dataclass(frozen=True)
class ListenerRound:
    """One round's counted window: its kind, length, images' worth of steps done, and the server's CPU in it."""

    kind: str
    seconds: float
    images: float  # denoising steps done in the window / steps per image
    http_cpu_s: float
    workers_cpu_s: float
    others_cpu_s: float = 0.0  # the machine's busy CPU that was neither the server's nor the bench's
    bench_cpu_s: float = 0.0  # the bench's own: its measuring client and listener clients

    @property
    def ips(self) -> float:
        """Images per second over the window."""
        return self.images / self.seconds


@dataclass(frozen=True)
class KindFigures:
    """One kind of round summed up: images/s, CPU per image and, against the no-stream rounds, the change."""

    kind: str
    rounds: int
    ips_median: float
    http_cpu_per_image_s: float  # all its windows' HTTP CPU / all their images
    workers_cpu_per_image_s: float
    ratio_median: float | None = None  # images/s / the adjacent no-stream round's; None for the no-stream kind
    ratio_min: float | None = None
    ratio_max: float | None = None
    cpu_share: float | None = None  # see `cpu_share`

    @property
    def slowdown(self) -> float | None:
        """1 - the median ratio: the verdict's figure."""
        return None if self.ratio_median is None else 1 - self.ratio_median


def round_order(rounds: int) -> list[str]:
    """The kinds in the order they run: ABC, CBA, ABC, ... (`rounds` of each)."""
    return [kind for i in range(rounds) for kind in (KINDS if i % 2 == 0 else KINDS[::-1])]


def adjacent_ratios(order: Sequence[tuple[str, float]], kind: str) -> list[float]:
    """Each `kind` round's images/s over its nearest no-stream round's (the mean of two equally near ones)."""
    bases = [i for i, (k, _) in enumerate(order) if k == NONE]
    if not bases:
        raise ValueError("no no-stream round to compare with")
    ratios = []
    for i, (k, ips) in enumerate(order):
        if k != kind:
            continue
        nearest = min(abs(i - b) for b in bases)
        base = statistics.fmean(order[b][1] for b in bases if abs(i - b) == nearest)
        ratios.append(ips / base)
    return ratios


def cpu_share(http_per_image_s: float, http_quiet_per_image_s: float, workers_quiet_per_image_s: float) -> float:
    """The HTTP CPU listeners add per image over the server's whole CPU per image without them.

    On a CPU-bound server whose workers fill every core, each CPU second the HTTP process spends on
    listeners comes out of the workers, so this share bounds the images/s they cost.
    """
    return (http_per_image_s - http_quiet_per_image_s) / (http_quiet_per_image_s + workers_quiet_per_image_s)


def summarize(rounds: Sequence[ListenerRound]) -> dict[str, KindFigures]:
    """Per kind: median images/s, pooled CPU per image, and (listener kinds) round ratios and CPU share."""
    order = [(r.kind, r.ips) for r in rounds]

    def pooled(kind: str) -> tuple[float, float]:
        mine = [r for r in rounds if r.kind == kind]
        images = sum(r.images for r in mine)
        return sum(r.http_cpu_s for r in mine) / images, sum(r.workers_cpu_s for r in mine) / images

    quiet_http, quiet_workers = pooled(NONE)
    figures = {}
    for kind in KINDS:
        mine = [r for r in rounds if r.kind == kind]
        if not mine:
            continue
        http, workers = pooled(kind)
        figure = KindFigures(kind, len(mine), statistics.median(r.ips for r in mine), http, workers)
        if kind != NONE:
            ratios = adjacent_ratios(order, kind)
            figure = KindFigures(
                kind, len(mine), figure.ips_median, http, workers, statistics.median(ratios), min(ratios),
                max(ratios), cpu_share(http, quiet_http, quiet_workers),
            )
        figures[kind] = figure
    return figures


@dataclass
class ListenerReport:
    """The price of `listeners` open SSE streams on a busy `cpu:2` server, by wall clock and by CPU time."""

    listeners: int
    images_per_round: int
    rounds_per_kind: int
    listener_priority: str  # how the listener clients ran once their streams were open
    kinds: dict[str, KindFigures]
    rounds: list[ListenerRound] = field(default_factory=list)  # every window, in the order run
    seconds: float = 0.0  # the whole measurement, server start included

    def rows(self) -> list[tuple[str, str, str]]:
        """Table rows: images/s per kind, the slowdowns (median, spread), CPU per image and the CPU share."""
        names = {NONE: "no event stream", IDLE: f"{self.listeners} idle SSE listeners",
                 FOLLOWING: f"{self.listeners} SSE listeners following every step"}
        rows = []
        for kind, figure in self.kinds.items():
            rows.append((f"cpu:2 async jobs, {names[kind]}, median", f"{figure.ips_median:.3f} img/s", ""))
        for kind, figure in self.kinds.items():
            if figure.slowdown is None:
                continue
            assert figure.ratio_min is not None and figure.ratio_max is not None
            spread = f"rounds {100 * (1 - figure.ratio_max):.1f} to {100 * (1 - figure.ratio_min):.1f} %"
            verdict = verdict_text(figure.slowdown < TARGET_SLOWDOWN, "< 3 %") + ", " if kind == IDLE else ""
            rows.append((
                f"slowdown, {names[kind]} (median of {figure.rounds} round ratios)",
                f"{100 * figure.slowdown:.1f} %",
                f"{verdict}{spread}",
            ))
        for kind, figure in self.kinds.items():
            rows.append((
                f"HTTP process / worker CPU per image, {names[kind]}",
                f"{1000 * figure.http_cpu_per_image_s:.1f} / {1000 * figure.workers_cpu_per_image_s:.0f} ms",
                "",
            ))
        for kind, figure in self.kinds.items():
            if figure.cpu_share is not None:
                rows.append((f"listener CPU share (bounds the slowdown), {names[kind]}",
                             f"{100 * figure.cpu_share:.2f} %", ""))
        if self.rounds:
            others = [r.others_cpu_s / r.seconds for r in self.rounds]
            rows.append(("other processes' CPU during the windows, median", f"{statistics.median(others):.2f} cores",
                         f"max {max(others):.2f}: the wall-clock ratios are only as good as this is small"))
        return rows


def verdict_text(ok: bool, target: str) -> str:
    """A table row's judgement against its target (the bench's tables share it)."""
    return f"target {target}: {'met' if ok else 'MISSED'}"


# ---------------------------------------------------------------------- the listener clients (child process)
def lowest_priority() -> str:
    """Run the calling thread only on CPU nothing else wants: SCHED_IDLE where Linux has it, else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        os.nice(19)
        return "nice 19"


def listener_client(conn: Connection, base_url: str) -> None:
    """The child process: take a list of event URLs, open one stream per URL, then drop to the lowest priority,
    report that all are open (and how it runs now), and read every stream to its end."""
    conn.send(("ready",))
    urls: list[str] = conn.recv()
    asyncio.run(_listen(conn, base_url, urls))


async def _listen(conn: Connection, base_url: str, urls: list[str]) -> None:
    opened = 0
    all_open = asyncio.Event()

    async def one(client: httpx.AsyncClient, url: str) -> None:
        nonlocal opened
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise RuntimeError(f"event stream refused: {response.status_code}")
            opened += 1
            if opened == len(urls):
                all_open.set()
            async for _ in response.aiter_lines():  # every event is read, as a real client would
                pass

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=CHILD_TIMEOUT_S, limits=limits) as client:
        streams = [asyncio.create_task(one(client, url)) for url in urls]
        waiting = asyncio.create_task(all_open.wait())
        await asyncio.wait([waiting, *streams], return_when=asyncio.FIRST_COMPLETED)
        if not all_open.is_set():  # a stream failed (or ended) before the rest opened
            waiting.cancel()
            await asyncio.gather(*streams)
            raise RuntimeError(f"only {opened} of {len(urls)} event streams opened")
        conn.send(("open", lowest_priority()))
        await asyncio.gather(*streams)


def _expect(conn: Connection, child: Any, what: str, timeout_s: float = CHILD_TIMEOUT_S) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if not child.is_alive():
            raise RuntimeError(f"the listener process exited ({child.exitcode}) before sending {what!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the listener process sent no {what!r} within {timeout_s:.0f} s")
    message = conn.recv()
    if message[0] != what:
        raise RuntimeError(f"the listener process sent {message!r}, expected {what!r}")
    return tuple(message)


# ---------------------------------------------------------------------- the measuring client and one round
class _Meter:
    """The measuring client: submits jobs, polls the last one, sweeps every job's steps; the same in every kind."""

    def __init__(self, server: ServerProcess, params: dict[str, Any], model: str) -> None:
        self.client = server.client
        self.body = {**params, "model": model, "sampler": "pndm", "response_format": "url"}

    def submit(self, seed: int, **change: Any) -> str:
        response = self.client.post("/v1/generations", json={**self.body, "seed": seed, **change},
                                    headers={"Prefer": "respond-async"})
        if response.status_code != 202:
            raise RuntimeError(f"bench job refused: {response.status_code} {response.text[:500]}")
        return str(response.headers["location"])

    def status(self, location: str) -> dict[str, Any]:
        return dict(self.client.get(location).json())

    def sweep(self, locations: Sequence[str]) -> tuple[float, int, list[str]]:
        """(the sweep's middle instant, steps done over every job, their states)."""
        started = time.time()
        statuses = [self.status(location) for location in locations]
        return (started + time.time()) / 2, sum(s["steps_done"] for s in statuses), [s["state"] for s in statuses]


FINAL = ("succeeded", "failed", "canceled")


def run_round(
    server: ServerProcess, meter: _Meter, kind: str, *, images: int, steps: int, listeners: int, seed: int,
    worker_pids: Sequence[int], ctx: Any,
) -> tuple[ListenerRound, str]:
    """One round of `kind`; returns its counted window and how the listener clients ran (empty: none)."""
    assert server.process is not None
    http_pid = server.process.pid
    child = conn = None
    if kind != NONE:  # started and imported before the round, so its start-up is not in it
        conn, child_conn = ctx.Pipe()
        child = ctx.Process(target=listener_client, args=(child_conn, server.url), daemon=True)
        child.start()
        _expect(conn, child, "ready")
    priority = ""
    try:
        locations = [meter.submit(seed + k) for k in range(images)]
        tail = meter.submit(seed + images, steps=steps + 1) if kind == IDLE else None  # cannot share their call
        if conn is not None:
            targets = [tail] * listeners if tail is not None else [locations[i % images] for i in range(listeners)]
            conn.send([f"{location}/events" for location in targets])
            priority = _expect(conn, child, "open")[1]
        bench_pids = [os.getpid()] + ([child.pid] if child is not None else [])
        start, steps_start, states = meter.sweep(locations)
        cpu_start = sample_cpu(http_pid, worker_pids, bench_pids)
        if "queued" not in states:
            raise RuntimeError(f"every job had left the queue before the {kind} round's window opened: "
                               "submit more images per round")
        while meter.status(locations[-1])["state"] == "queued":
            time.sleep(POLL_S)
        end, steps_end, _ = meter.sweep(locations)
        cpu = sample_cpu(http_pid, worker_pids, bench_pids) - cpu_start
        if tail is not None:  # its listeners are done: it must not run
            meter.client.post(f"{tail}/cancel")
        for location in reversed(locations):
            while meter.status(location)["state"] not in FINAL:
                time.sleep(POLL_S)
    finally:
        if child is not None:  # at the lowest priority, reading what is left: the server no longer waits on it
            child.join(timeout=CHILD_DRAIN_S)
            if child.is_alive():
                child.kill()
                child.join()
    window = ListenerRound(
        kind, end - start, (steps_end - steps_start) / steps, cpu.http_s, cpu.workers_s, cpu.others_s, cpu.bench_s
    )
    return window, priority


def measure_listener_cost(
    work: Path, images: int, params: dict[str, Any], *, model: str, listeners: int = 200, rounds: int = 8,
) -> ListenerReport:
    """Interleaved rounds of the three kinds on one busy `cpu:2` server; their figures (see the module doc)."""
    began = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    server = ServerProcess(work / "data", SAMESEED_WORKERS="cpu:2", SAMESEED_DEFAULT_MODEL=model).start()
    windows: list[ListenerRound] = []
    priorities = set()
    try:
        assert server.process is not None
        meter = _Meter(server, params, model)
        for warm in [meter.submit(100 + k) for k in range(2)]:  # both workers
            while meter.status(warm)["state"] not in FINAL:
                time.sleep(POLL_S)
        worker_pids = descendants(process_stats(), server.process.pid)
        for i, kind in enumerate(round_order(rounds)):
            window, priority = run_round(
                server, meter, kind, images=images, steps=params["steps"], listeners=listeners,
                seed=10_000 + 100 * i, worker_pids=worker_pids, ctx=ctx,
            )
            windows.append(window)
            priorities.add(priority)
    finally:
        server.stop()
    return ListenerReport(
        listeners=listeners, images_per_round=images, rounds_per_kind=rounds,
        listener_priority=", ".join(sorted(p for p in priorities if p)), kinds=summarize(windows), rounds=windows,
        seconds=time.monotonic() - began,
    )
