"""Admission policy: pure functions from a pressure snapshot and store state to a decision.

Pressure uses two watermarks, as zswap's ``accept_threshold_percent`` does: once
used memory reaches ``high_percent`` the store refuses, and it keeps refusing
until used memory falls to ``low_percent``.  Without the gap, a store hovering
at the threshold would flip on every sample and spread one workload's pages
between host and backing at random.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pressure import Snapshot
from .messages import PageStatus

DEFAULT_MAX_DEVICE_SIZE = 16 << 40  # 16 TiB


@dataclass(frozen=True, slots=True)
class Limits:
    high_percent: float = 90.0
    low_percent: float = 80.0
    capacity_pages: int = 0  # all clients together; 0 = no pages at all
    quota_pages: int | None = None  # per client; None = no quota
    max_device_size: int = DEFAULT_MAX_DEVICE_SIZE  # larger devices are refused at hello

    def __post_init__(self) -> None:
        if not 0 < self.low_percent <= self.high_percent <= 100:
            raise ValueError(
                f"watermarks need 0 < low ({self.low_percent}) <= high ({self.high_percent}) <= 100"
            )
        if self.capacity_pages < 0:
            raise ValueError("capacity must not be negative")
        if self.quota_pages is not None and self.quota_pages < 0:
            raise ValueError("quota must not be negative")
        if self.max_device_size <= 0:
            raise ValueError("the device size limit must be positive")


def under_pressure(snapshot: Snapshot, limits: Limits, was_under_pressure: bool) -> bool:
    """The hysteresis: enter at the high watermark, leave at the low one."""
    if was_under_pressure:
        return snapshot.used_percent > limits.low_percent
    return snapshot.used_percent >= limits.high_percent


def admit(
    limits: Limits,
    pressure: bool,
    store_pages: int,
    client_pages: int,
    replaces: bool,
) -> PageStatus:
    """Decide one page.  ``replaces``: the client's older version of this page is
    stored, so accepting costs no new page of capacity or quota."""
    if pressure:
        return PageStatus.REFUSED_PRESSURE
    if replaces:
        return PageStatus.STORED
    if store_pages >= limits.capacity_pages:
        return PageStatus.REFUSED_CAPACITY
    if limits.quota_pages is not None and client_pages >= limits.quota_pages:
        return PageStatus.REFUSED_QUOTA
    return PageStatus.STORED
