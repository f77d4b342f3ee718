"""Admission policy driven by fake pressure snapshots."""

from __future__ import annotations

import pytest

from hoststore.policy import Limits, admit, under_pressure
from hoststore.pressure import Sampler, Snapshot, read_psi
from pagewire.protocol import PageStatus

LIMITS = Limits(high_percent=90, low_percent=80, capacity_pages=100, quota_pages=10)


def walk(percents: list[float]) -> list[bool]:
    state, out = False, []
    for pct in percents:
        state = under_pressure(Snapshot.fake(pct), LIMITS, state)
        out.append(state)
    return out


def test_hysteresis_enters_at_high_and_leaves_at_low() -> None:
    assert walk([50, 89.9, 90, 85, 80.1, 80, 85, 89, 95]) == [
        False, False, True, True, True, False, False, False, True,
    ]


def test_hysteresis_from_refusing_does_not_flap_between_watermarks() -> None:
    # Hovering between the watermarks never changes the decision, whichever way it was entered.
    assert walk([95] + [85, 86, 84, 89] * 3) == [True] * 13
    assert walk([70] + [85, 86, 84, 89] * 3) == [False] * 13


def test_pressure_refuses_even_a_replacement() -> None:
    assert admit(LIMITS, True, 0, 0, replaces=True) == PageStatus.REFUSED_PRESSURE


def test_capacity_and_quota() -> None:
    assert admit(LIMITS, False, 99, 9, False) == PageStatus.STORED
    assert admit(LIMITS, False, 100, 0, False) == PageStatus.REFUSED_CAPACITY
    assert admit(LIMITS, False, 50, 10, False) == PageStatus.REFUSED_QUOTA
    # A replacement takes no new capacity or quota.
    assert admit(LIMITS, False, 100, 10, True) == PageStatus.STORED


def test_limits_reject_inverted_watermarks() -> None:
    with pytest.raises(ValueError):
        Limits(high_percent=70, low_percent=80)


def test_sampler_reads_at_most_once_per_interval() -> None:
    now = [0.0]
    reads = []

    def source() -> Snapshot:
        reads.append(now[0])
        return Snapshot.fake(10 + len(reads))

    sampler = Sampler(0.005, source=source, clock=lambda: now[0])
    first = sampler.get()
    for _ in range(1000):
        assert sampler.get() is first
    now[0] = 0.0049
    assert sampler.get() is first
    now[0] = 0.005
    assert sampler.get() is not first
    assert reads == [0.0, 0.005] and sampler.samples == 2


def test_psi_parsing(tmp_path) -> None:
    f = tmp_path / "memory"
    f.write_text("some avg10=1.50 avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert read_psi(str(f)) == 1.5
    assert read_psi(str(tmp_path / "missing")) is None
