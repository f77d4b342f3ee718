"""Memory pressure snapshots: the only module that reads psutil.

Admission decisions are made per batch, thousands of times a second, while
memory pressure changes slowly; :class:`Sampler` therefore reads the system at
most once per ``interval`` and hands out the cached snapshot in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

PSI_PATH = "/proc/pressure/memory"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Machine memory at one instant.  ``used_percent`` is what the watermarks compare."""

    total: int
    available: int
    used_percent: float
    psi_some_avg10: float | None = None  # None where the kernel has no PSI

    @classmethod
    def fake(cls, used_percent: float, total: int = 1 << 34) -> "Snapshot":
        """A snapshot for tests and dry runs."""
        return cls(total, int(total * (100 - used_percent) / 100), used_percent)


def read_psi(path: str = PSI_PATH) -> float | None:
    """``some avg10`` from the PSI file, or None when the kernel does not offer it."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some "):
                    for part in line.split():
                        if part.startswith("avg10="):
                            return float(part[6:])
    except (OSError, ValueError):
        return None
    return None


def sample() -> Snapshot:
    vm = psutil.virtual_memory()
    return Snapshot(vm.total, vm.available, float(vm.percent), read_psi())


class Sampler:
    """Caches :func:`sample` for ``interval`` seconds of ``clock``."""

    def __init__(
        self,
        interval: float = 0.005,
        source: Callable[[], Snapshot] = sample,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._source = source
        self._clock = clock
        self._taken_at = float("-inf")
        self._snapshot: Snapshot | None = None
        self.samples = 0

    def get(self) -> Snapshot:
        now = self._clock()
        if self._snapshot is None or now - self._taken_at >= self.interval:
            self._snapshot = self._source()
            self._taken_at = now
            self.samples += 1
        return self._snapshot


class FileSource:
    """Pressure read from a file holding a used-memory percentage: a pressure
    source that experiments and tests can steer (``--pressure-source file:PATH``).
    Where the file is missing or does not hold a number, the machine's real
    pressure is used."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> Snapshot:
        try:
            with open(self.path) as f:
                percent = float(f.read().strip())
        except (OSError, ValueError):
            return sample()
        return Snapshot.fake(min(max(percent, 0.0), 100.0))


def parse_source(text: str) -> Callable[[], Snapshot]:
    """``psutil`` (the machine's memory) or ``file:PATH``; ValueError otherwise."""
    if text == "psutil":
        return sample
    kind, sep, path = text.partition(":")
    if kind == "file" and sep and path:
        return FileSource(path)
    raise ValueError(f"pressure source {text!r} is not 'psutil' or 'file:PATH'")
