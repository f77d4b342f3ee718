"""Pressure stall information: the cumulative stall times of a PSI file.

A PSI file (``/proc/pressure/memory``, or a v2 cgroup's ``memory.pressure``) has
two lines, ``some`` and ``full``, each ending in ``total=`` microseconds of
stall since boot.  Controllers use the growth of ``some`` over an interval,
as Senpai does: an average (``avg10``) lags and rounds small stalls to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

MACHINE_MEMORY = "/proc/pressure/memory"


@dataclass(frozen=True)
class Stall:
    """Microseconds during which some / all non-idle tasks waited for memory."""

    some_us: int
    full_us: int

    def __sub__(self, other: "Stall") -> "Stall":
        return Stall(self.some_us - other.some_us, self.full_us - other.full_us)


def parse(text: str) -> Stall:
    totals = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        values = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        if "total" not in values:
            raise ValueError(f"PSI line without total=: {line!r}")
        totals[fields[0]] = int(values["total"])
    if "some" not in totals:
        raise ValueError("PSI text without a 'some' line")
    return Stall(totals["some"], totals.get("full", 0))


def read(path: str) -> Stall:
    with open(path) as f:
        return parse(f.read())
