"""The controllers' law: probe while the signal stays under its budget, back off above it.

This is the law of Meta's Senpai (TMO, ASPLOS'22), as its published agent
describes it: every second, add the signal observed since the last second to
an integral.  When the integral exceeds the budget of one interval, loosen the
limit at once, by ``(integral / budget / coeff_backoff)**2`` of it, at most
``max_backoff``; otherwise, once an interval has passed since the last change,
tighten it by ``(budget / integral / coeff_probe)**2``, at most ``step``.  Both
corrections grow quadratically with the distance from the budget, so the
limit moves fast when far from the working set and creeps near it.

One engine, two signals (``Controller`` picks):

* ``senpai``: microseconds of memory stall ("some", PSI) against
  ``--pressure-threshold`` microseconds per interval;
* ``swapin-slo`` (Google's far memory, ASPLOS'19): pages swapped in against
  the pages the SLO allows per interval, ``slo`` of the working set per minute.

Pure: no clock, no files; ``tests/test_offload.py`` drives it with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE, BACK_OFF, WAIT = "probe", "back off", "wait"


@dataclass(frozen=True)
class Tuning:
    """Defaults are Senpai's (facebookincubator/senpai, senpai.py): a probe every 6 s,
    at most 1% tighter; a back-off of at most 100% (the limit may double); the
    corrections reach those bounds at 1/10 and 20 times the budget."""

    interval: float = 6.0
    step: float = 0.01
    max_backoff: float = 1.0
    coeff_probe: float = 10.0
    coeff_backoff: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.interval < float("inf"):
            raise ValueError("the interval must be a finite number of seconds above 0")
        if not 0 < self.step < 1:
            raise ValueError("the step must be a fraction above 0 and below 1")
        if self.max_backoff <= 0 or self.coeff_probe <= 0 or self.coeff_backoff <= 0:
            raise ValueError("back-off and coefficients must be above 0")


@dataclass(frozen=True)
class Decision:
    """``factor``: the limit's relative change (below 0 tighter, above 0 looser, 0 kept)."""

    factor: float
    action: str
    observed: float
    budget: float


class ProbeBackoff:
    def __init__(self, tuning: Tuning, now: float) -> None:
        self.tuning = tuning
        self.integral = 0.0
        self.since = now  # the last change (or the start): a probe waits an interval after it

    def tick(self, now: float, observed: float, budget: float) -> Decision:
        """One second's ``observed`` signal against one interval's ``budget`` (> 0)."""
        t = self.tuning
        budget = max(budget, 1e-9)
        self.integral += max(observed, 0.0)
        integral = self.integral
        if integral > budget:
            adj = min((integral / budget / t.coeff_backoff) ** 2, 1.0) * t.max_backoff
            self._changed(now)
            return Decision(adj, BACK_OFF, integral, budget)
        if now - self.since < t.interval:
            return Decision(0.0, WAIT, integral, budget)
        # Nothing observed is as good as it gets: the full step.  (Senpai's integral
        # is in microseconds and floored at 1; a floor relative to the budget does
        # the same for any unit.)
        err = budget / max(integral, budget / 1000)
        adj = min((err / t.coeff_probe) ** 2, 1.0) * t.step
        self._changed(now)
        return Decision(-adj, PROBE, integral, budget)

    def _changed(self, now: float) -> None:
        self.integral = 0.0
        self.since = now
