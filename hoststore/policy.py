"""Admission policy: pure functions from a pressure snapshot and store state to a decision.

Pressure uses two watermarks, as zswap's ``accept_threshold_percent`` does: once
used memory reaches ``high_percent`` the store refuses, and it keeps refusing
until used memory falls to ``low_percent``.  Without the gap, a store hovering
at the threshold would flip on every sample and spread one workload's pages
between host and backing at random.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .pressure import Snapshot
from pagewire.messages import PageStatus

DEFAULT_MAX_DEVICE_SIZE = 16 << 40  # 16 TiB
# Once the store is this full, a client at or above its weighted share gets no
# new pages: the rest of the capacity is kept for the clients below theirs.
FAIR_RESERVE = 0.10


@dataclass(frozen=True, slots=True)
class Limits:
    high_percent: float = 90.0
    low_percent: float = 80.0
    capacity_pages: int = 0  # all clients together; 0 = no pages at all
    quota_pages: int | None = None  # per client without a quota of its own; None = no quota
    max_device_size: int = DEFAULT_MAX_DEVICE_SIZE  # larger devices are refused at hello
    quotas: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # pages, by client name
    weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # by client name; default 1

    def quota_of(self, name: str) -> int | None:
        return self.quotas.get(name, self.quota_pages)

    def weight_of(self, name: str) -> float:
        return self.weights.get(name, 1.0)

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
        if any(q < 0 for q in self.quotas.values()):
            raise ValueError("quotas must not be negative")
        if any(not w > 0 for w in self.weights.values()):
            raise ValueError("weights must be positive")


@dataclass(frozen=True, slots=True)
class ClientTerms:
    """What one client may hold now: its quota, and its weighted share of the capacity."""

    quota_pages: int | None
    share_pages: int


def share(capacity_pages: int, weight: float, total_weight: float) -> int:
    """A client's weighted share of the capacity among the clients that count now."""
    return int(capacity_pages * weight / total_weight) if total_weight > 0 else capacity_pages


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
    terms: ClientTerms | None = None,
) -> PageStatus:
    """Decide one page.  ``replaces``: the client's older version of this page is
    stored, so accepting costs no new page of capacity or quota.  Without
    ``terms`` the client has the default quota and the whole capacity as share."""
    if terms is None:
        terms = ClientTerms(limits.quota_pages, limits.capacity_pages)
    if pressure:
        return PageStatus.REFUSED_PRESSURE
    if replaces:
        return PageStatus.STORED
    if store_pages >= limits.capacity_pages:
        return PageStatus.REFUSED_CAPACITY
    if terms.quota_pages is not None and client_pages >= terms.quota_pages:
        return PageStatus.REFUSED_QUOTA
    if client_pages >= terms.share_pages and store_pages >= limits.capacity_pages * (1 - FAIR_RESERVE):
        return PageStatus.REFUSED_SHARE
    return PageStatus.STORED
