"""The listener bench's pure parts: /proc CPU accounting, round order, round ratios, CPU share and verdict."""

import os
import threading

import pytest

from app.cli.commands import parser
from app.cli.listener_bench import (
    FOLLOWING,
    IDLE,
    NONE,
    CpuSample,
    ListenerReport,
    ListenerRound,
    adjacent_ratios,
    cpu_seconds,
    cpu_share,
    descendants,
    lowest_priority,
    machine_busy_seconds,
    round_order,
    sample_cpu,
    summarize,
)
from app.cli.server_process import stat_fields


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    """A /proc/PID/stat line as Linux writes it (fields 14 and 15: utime, stime in clock ticks)."""
    middle = " ".join(["0"] * 9)  # pgrp .. cmajflt (fields 5-13)
    return f"{pid} ({comm}) S {ppid} {middle} {utime} {stime} 7 8 20 0 3 0 12345 1000 200\n"


def test_cpu_seconds_are_user_plus_system_ticks_even_when_the_name_has_spaces_and_parentheses():
    fields = stat_fields(_stat(4321, "python -m (app) serve", 1, utime=250, stime=50))
    assert fields[0] == "S" and fields[1] == "1"
    assert cpu_seconds(fields, ticks_per_s=100) == pytest.approx(3.0)
    assert cpu_seconds(fields, ticks_per_s=1000) == pytest.approx(0.3)


def test_descendants_are_the_whole_tree_below_the_server_and_nothing_beside_it():
    tree = {10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}  # 10 the HTTP process; 20 another server
    stats = [(pid, stat_fields(_stat(pid, "p", ppid, 0, 0))) for pid, ppid in tree.items()]
    assert descendants(stats, 10) == [11, 12, 13]
    assert descendants(stats, 13) == []


def _proc_stat(user: int, nice: int, system: int, idle: int, iowait: int, irq: int, softirq: int, steal: int) -> str:
    return (f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\n"
            f"cpu0 {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\nintr 1 2 3\n")


def test_machine_busy_time_is_every_tick_but_idle_and_iowait_steal_included():
    assert machine_busy_seconds(_proc_stat(100, 20, 30, 5000, 70, 4, 6, 40), ticks_per_s=100) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        machine_busy_seconds("intr 1 2 3\n", ticks_per_s=100)


def test_a_cpu_sample_sums_the_workers_and_a_later_one_minus_an_earlier_is_the_window():
    def sample(ticks: dict[int, tuple[int, int]], machine: str) -> CpuSample:
        return sample_cpu(10, [11, 12], [30], read=lambda pid: stat_fields(_stat(pid, "p", 1, *ticks[pid])),
                          read_machine=lambda: machine, ticks_per_s=100)

    before = sample({10: (100, 20), 11: (900, 30), 12: (800, 10), 30: (50, 0)}, _proc_stat(2000, 0, 0, 0, 0, 0, 0, 0))
    assert (before.http_s, before.workers_s, before.bench_s, before.machine_s) == pytest.approx((1.2, 17.4, 0.5, 20))
    after = sample({10: (110, 22), 11: (1000, 30), 12: (880, 10), 30: (53, 0)},
                   _proc_stat(2150, 0, 10, 0, 0, 0, 0, 40))  # 2 s of the machine's busy time in the window
    window = after - before
    assert (window.http_s, window.workers_s, window.bench_s) == pytest.approx((0.12, 1.8, 0.03))
    assert window.others_s == pytest.approx(2.0 - 0.12 - 1.8 - 0.03)  # someone else's process, or steal


def test_kinds_alternate_abc_then_cba():
    assert round_order(3) == [NONE, IDLE, FOLLOWING, FOLLOWING, IDLE, NONE, NONE, IDLE, FOLLOWING]


def test_each_round_is_compared_with_the_nearest_no_stream_round():
    order = [(NONE, 2.0), (IDLE, 1.9), (FOLLOWING, 1.5), (FOLLOWING, 1.6), (IDLE, 1.0), (NONE, 1.0)]
    assert adjacent_ratios(order, IDLE) == pytest.approx([0.95, 1.0])
    assert adjacent_ratios(order, FOLLOWING) == pytest.approx([0.75, 1.6])  # each one's nearer no-stream round
    tied = [(NONE, 2.0), (IDLE, 1.5), (NONE, 1.0)]
    assert adjacent_ratios(tied, IDLE) == pytest.approx([1.0])  # two equally near: their mean, 1.5
    with pytest.raises(ValueError):
        adjacent_ratios([(IDLE, 1.0)], IDLE)


def test_the_cpu_share_is_the_added_http_cpu_over_the_whole_server_cpu_per_image():
    assert cpu_share(0.050, 0.040, 0.960) == pytest.approx(0.01)
    assert cpu_share(0.039, 0.040, 0.960) == pytest.approx(-0.001)  # noise can make it negative: shown as it is


def _rounds(idle_ips: list[float]) -> list[ListenerRound]:
    """ABC, CBA rounds: no stream at 2 img/s, following at 1.5; HTTP CPU 40 ms/image quiet, 60 following."""
    ips = {NONE: [2.0, 2.0], IDLE: idle_ips, FOLLOWING: [1.5, 1.5]}
    http = {NONE: 0.04, IDLE: 0.041, FOLLOWING: 0.06}
    seen = {kind: 0 for kind in ips}
    rounds = []
    for kind in round_order(2):
        rate = ips[kind][seen[kind]]
        seen[kind] += 1
        rounds.append(ListenerRound(kind, seconds=10 / rate, images=10, http_cpu_s=10 * http[kind],
                                    workers_cpu_s=9.6))
    return rounds


def test_summary_gives_median_ratios_their_spread_pooled_cpu_per_image_and_the_share():
    figures = summarize(_rounds(idle_ips=[1.98, 1.9]))
    assert figures[NONE].ips_median == pytest.approx(2.0) and figures[NONE].ratio_median is None
    idle = figures[IDLE]
    assert (idle.ratio_min, idle.ratio_max) == (pytest.approx(0.95), pytest.approx(0.99))
    assert idle.slowdown == pytest.approx(0.03)
    assert idle.http_cpu_per_image_s == pytest.approx(0.041) and idle.workers_cpu_per_image_s == pytest.approx(0.96)
    assert idle.cpu_share == pytest.approx(0.001 / 1.0)
    assert figures[FOLLOWING].slowdown == pytest.approx(0.25)
    assert figures[FOLLOWING].cpu_share == pytest.approx(0.02)


@pytest.mark.parametrize(("idle_ips", "verdict"), [([2.0, 1.96], "met"), ([1.9, 1.9], "MISSED")])
def test_the_verdict_is_the_idle_median_slowdown_under_3_percent(idle_ips, verdict):
    report = ListenerReport(listeners=200, images_per_round=12, rounds_per_kind=2, listener_priority="SCHED_IDLE",
                            kinds=summarize(_rounds(idle_ips)))
    rows = {name: (value, target) for name, value, target in report.rows()}
    value, target = rows["slowdown, 200 idle SSE listeners (median of 2 round ratios)"]
    assert target.startswith(f"target < 3 %: {verdict}")
    assert value == ("1.0 %" if verdict == "met" else "5.0 %")
    share = rows["listener CPU share (bounds the slowdown), 200 idle SSE listeners"][0]
    assert share == "0.10 %"
    assert "other processes' CPU during the windows, median" not in rows  # no rounds kept: no load figure


def test_the_load_of_other_processes_is_shown_beside_the_figures():
    rounds = [ListenerRound(NONE, seconds=4, images=8, http_cpu_s=0.1, workers_cpu_s=6, others_cpu_s=others)
              for others in (0.4, 0.8, 4.0)]
    report = ListenerReport(listeners=200, images_per_round=12, rounds_per_kind=3, listener_priority="",
                            kinds=summarize(rounds), rounds=rounds)
    value, target = {name: (v, t) for name, v, t in report.rows()}["other processes' CPU during the windows, median"]
    assert value == "0.20 cores" and target.startswith("max 1.00")


def test_listener_clients_drop_to_the_lowest_priority():
    seen = {}

    def drop() -> None:  # in a thread of its own: Linux sets the policy per thread, this test's stays as it was
        seen["how"] = lowest_priority()
        seen["policy"] = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, 0)

    thread = threading.Thread(target=drop)
    thread.start()
    thread.join()
    if seen["how"] == "SCHED_IDLE":
        assert seen["policy"] == os.SCHED_IDLE
    else:
        assert seen["how"] == "nice 19" and seen["nice"] == 19


def test_the_bench_can_run_the_listener_measurement_alone():
    args = parser().parse_args(["bench", "--only", "listeners", "--rounds", "3"])
    assert (args.only, args.rounds, args.listeners) == ("listeners", 3, 200)
