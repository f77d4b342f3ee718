"""``vswapctl.cpuwatch``: a phase's CPU read off readings taken around it."""

from __future__ import annotations

import os
import time

from vswapctl.cpuwatch import CpuWatch
from vswapctl.procs import cpu_seconds


def watch_over(readings: list[tuple[float, float | None]]) -> CpuWatch:
    """A watch whose readings are ``(time, seconds)`` of one process, taken by hand."""
    times = iter([t for t, _ in readings])
    figures = iter([v for _, v in readings])
    watch = CpuWatch({"p": 1}, read=lambda pid: next(figures), clock=lambda: next(times))
    for _ in readings:
        watch.take()
    return watch


def test_between_readings_in_proportion_to_time() -> None:
    watch = watch_over([(0.0, 0.0), (1.0, 0.5), (2.0, 1.5)])
    assert watch.between(0.5, 1.5) == {"p": 0.75}  # 0.25 .. 1.0
    assert watch.between(0.0, 2.0) == {"p": 1.5}
    assert watch.at(1.0) == {"p": 0.5}


def test_outside_the_readings_the_nearest_one() -> None:
    watch = watch_over([(1.0, 0.2), (2.0, 0.4)])
    assert watch.between(0.0, 9.0) == {"p": 0.2}
    assert watch.between(5.0, 9.0) == {"p": 0.0}


def test_a_process_gone_keeps_its_last_figure() -> None:
    watch = watch_over([(0.0, 1.0), (1.0, 2.0), (2.0, None), (3.0, None)])
    assert watch.between(0.0, 3.0) == {"p": 1.0}
    assert watch.between(1.0, 3.0) == {"p": 0.0}


def test_a_process_first_read_late_is_not_charged_its_life_so_far() -> None:
    watch = watch_over([(0.0, None), (1.0, 50.0), (2.0, 50.5)])
    assert watch.between(0.0, 2.0) == {"p": 0.5}  # what it did once known, not its life so far (50.5)
    assert watch.between(1.0, 2.0) == {"p": 0.5}
    assert watch.between(0.5, 2.0) == {"p": 0.5}  # from its first reading on


def test_a_process_that_never_answered_is_not_reported() -> None:
    watch = watch_over([(0.0, None), (1.0, None)])
    assert watch.between(0.0, 1.0) == {}


def test_a_real_process_cpu_is_seen_while_it_works() -> None:
    """This test's own process, read from another thread while it spins for 0.3 s of CPU."""
    assert cpu_seconds(os.getpid()) is not None
    with CpuWatch({"me": os.getpid()}, interval=0.01) as watch:
        start = time.monotonic()
        spun = time.process_time() + 0.3
        while time.process_time() < spun:
            pass
        end = time.monotonic()
    assert len(watch.readings) >= 3
    assert 0.15 <= watch.between(start, end)["me"] <= (end - start) * (os.cpu_count() or 1) + 0.05


def test_no_process_no_thread() -> None:
    with CpuWatch({}) as watch:
        pass
    assert watch._thread is None and watch.between(0.0, 1.0) == {}


def test_a_pid_that_is_not_there() -> None:
    assert cpu_seconds(2 ** 22 + 12345) is None
