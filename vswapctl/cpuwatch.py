"""CPU seconds of the processes serving a bench target, phase by phase.

A phase through a swap device costs CPU in the workload (its own code, and
the kernel's reclaim done in its name) and in each daemon serving the device.
On a machine with few cores their sum, not any one of them, can set the pace:
``vswapctl bench`` therefore reports each one's share of each phase, and how
many cores they kept busy together.

``/proc/PID/stat`` gives a process's user and system time, all its threads
together, in clock ticks.  A thread reads it every ``interval`` seconds with
the time of the reading (``time.monotonic``: CLOCK_MONOTONIC, which the
workload marks its phases with too), and a phase's share is read off the
readings around its two marks, in proportion to time between them: good to
about a tick plus one interval of each busy thread's time at each mark.
What no watched process runs is not counted: kswapd, the loop device's
workers, zram's compression outside the workload.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from .procs import cpu_seconds

INTERVAL = 0.02


Reading = tuple[float, dict[str, float]]


class CpuWatch:
    """Readings of each named process's CPU time while in the ``with`` block."""

    def __init__(self, pids: Mapping[str, int], interval: float = INTERVAL,
                 read: Callable[[int], float | None] = cpu_seconds,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.read = read
        self.clock = clock
        self.readings: list[Reading] = []
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> None:
        """One reading now.  A process that has gone keeps its last figure."""
        now = self.clock()
        for name, pid in self.pids.items():
            seconds = self.read(pid)
            if seconds is not None:
                self._last[name] = seconds
        self.readings.append((now, dict(self._last)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.take()

    def __enter__(self) -> "CpuWatch":
        self.take()
        if self.pids:
            self._thread = threading.Thread(target=self._run, name="vswapctl-cpuwatch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.take()

    def at(self, t: float) -> dict[str, float]:
        """Each process's CPU seconds at time ``t``, between the readings around it
        (the first or last reading outside them)."""
        times = [r[0] for r in self.readings]
        i = bisect.bisect_right(times, t)
        if i == 0:
            return dict(self.readings[0][1])
        if i == len(times):
            return dict(self.readings[-1][1])
        (t0, a), (t1, b) = self.readings[i - 1], self.readings[i]
        share = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        # A process first read at ``t1``: nothing known before it (not its whole life so far).
        return {name: a.get(name, b[name]) + (b[name] - a.get(name, b[name])) * share for name in b}

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process spent from ``start`` to ``end`` (ms-rounded): only
        those read by ``start``, so that no process is charged what it spent before."""
        a, b = self.at(start), self.at(end)
        return {name: round(b[name] - a[name], 3) for name in b if name in a}
