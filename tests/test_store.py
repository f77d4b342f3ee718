"""The host's page store: admission, never-stale, sequence numbers, sessions."""

from __future__ import annotations

import pytest

from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.protocol import PAGE_SIZE, PageStatus
from hoststore.store import RequestError, Store

S = PageStatus


def page(n: int, version: int = 0) -> bytes:
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8)


class Pressure:
    def __init__(self) -> None:
        self.percent = 10.0

    def __call__(self) -> Snapshot:
        return Snapshot.fake(self.percent)


def make_store(capacity: int = 8, quota: int | None = None) -> tuple[Store, Pressure]:
    pressure = Pressure()
    return Store(Limits(capacity_pages=capacity, quota_pages=quota), Sampler(0, source=pressure)), pressure


def test_put_get_roundtrip_and_counters() -> None:
    store, _ = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s1")
    assert store.put(c, 3, 1, page(3) + page(4)) == bytes([S.STORED, S.STORED])
    status, data = store.get(c, [4, 3, 5])
    assert list(status) == [S.STORED, S.STORED, S.MISSING]
    assert data == page(4) + page(3) + bytes(PAGE_SIZE)
    st = store.stats()
    assert (st["pages_stored"], st["accepted"], st["reads"], st["misses"]) == (2, 2, 2, 1)


def test_capacity_refuses_and_replacement_fits() -> None:
    store, _ = make_store(capacity=2)
    c = store.attach("a", 16 * PAGE_SIZE, "s")
    out = store.put(c, 0, 1, page(0) + page(1) + page(2))
    assert list(out) == [S.STORED, S.STORED, S.REFUSED_CAPACITY]
    assert store.put(c, 1, 2, page(1, 2)) == bytes([S.STORED])  # replaces: no new capacity
    assert store.get(c, [1])[1] == page(1, 2)
    assert store.counters.refused_capacity == 1 and store.counters.replaced == 1


def test_refused_new_version_drops_the_old_copy() -> None:
    store, pressure = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s")
    store.put(c, 5, 1, page(5, 1))
    pressure.percent = 95
    assert store.put(c, 5, 2, page(5, 2)) == bytes([S.REFUSED_PRESSURE])
    assert store.get(c, [5])[0] == bytes([S.MISSING])  # never the stale version 1
    assert store.counters.stale_dropped == 1 and store.stats()["pages_stored"] == 0


def test_late_older_put_never_overwrites_a_newer_version() -> None:
    store, _ = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s")
    store.put(c, 0, 7, page(0, 7))
    assert store.put(c, 0, 6, page(0, 6)) == bytes([S.REFUSED_OUTDATED])
    assert store.get(c, [0])[1] == page(0, 7)


def test_invalidate_respects_newer_versions() -> None:
    store, _ = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s")
    store.put(c, 0, 1, page(0) + page(1))
    store.put(c, 1, 3, page(1, 3))
    assert store.invalidate(c, 0, 2, 2) == 1  # page 0 (seq 1) dropped, page 1 (seq 3) kept
    assert list(store.get(c, [0, 1])[0]) == [S.MISSING, S.STORED]
    # An invalidated slot refuses a late put from before the invalidation.
    assert store.put(c, 0, 2, page(0, 2)) == bytes([S.REFUSED_OUTDATED])


def test_quota_per_client() -> None:
    store, _ = make_store(capacity=8, quota=2)
    a = store.attach("a", 16 * PAGE_SIZE, "s")
    b = store.attach("b", 16 * PAGE_SIZE, "s")
    assert list(store.put(a, 0, 1, page(0) * 3)) == [S.STORED, S.STORED, S.REFUSED_QUOTA]
    assert list(store.put(b, 0, 1, page(0) * 2)) == [S.STORED, S.STORED]


def test_reconnect_keeps_pages_new_session_drops_them() -> None:
    store, _ = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s1")
    store.put(c, 0, 1, page(0) * 3)
    with pytest.raises(RequestError, match="in use"):
        store.attach("a", 16 * PAGE_SIZE, "s2")
    store.detach(c)
    again = store.attach("a", 16 * PAGE_SIZE, "s1")
    assert again is c and store.stats()["pages_stored"] == 3
    store.detach(again)
    fresh = store.attach("a", 16 * PAGE_SIZE, "s2")
    assert fresh.count == 0 and store.stats()["pages_stored"] == 0
    assert store.counters.dropped_sessions == 3


@pytest.mark.parametrize("first,count", [(-1, 1), (15, 2), (16, 1)])
def test_out_of_range_requests_are_errors(first: int, count: int) -> None:
    store, _ = make_store()
    c = store.attach("a", 16 * PAGE_SIZE, "s")
    with pytest.raises(RequestError):
        store.put(c, first, 1, page(0) * count)
    with pytest.raises(RequestError):
        store.get(c, [first + count - 1 if first >= 0 else first])


def test_slab_reuses_freed_slots() -> None:
    store, _ = make_store(capacity=4)
    c = store.attach("a", 64 * PAGE_SIZE, "s")
    for round_ in range(10):
        base = (round_ % 4) * 4
        assert store.put(c, base, 2 * round_ + 1, page(base) * 4) == bytes(4)
        assert store.invalidate(c, base, 4, 2 * round_ + 1) == 4
    assert store.slab.used == 0 and store.slab.mapped_bytes == store.slab.chunk_pages * PAGE_SIZE
