"""The page rules, against a fake store that refuses, stalls, disconnects and forgets."""

from __future__ import annotations

import os
import random

import pytest
import trio

from hoststore.protocol import PAGE_SIZE
from vswapfs.backing import Backing
from vswapfs.pagemap import BACKING, HOST
from vswapfs.pager import InvalidIO, Pager, PageUnavailable

from .fakestore import FakeStore

NPAGES = 256


def page(n: int, version: int) -> bytes:
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8)


@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), NPAGES * PAGE_SIZE)
    yield b
    b.close()


def make(backing: Backing, capacity: int | None = None, **kw) -> tuple[Pager, FakeStore]:
    store = FakeStore(NPAGES, capacity)
    return Pager(backing, store, write_timeout=kw.get("write_timeout", 1.0),
                 read_timeout=kw.get("read_timeout", 5.0)), store


async def test_unwritten_pages_read_as_zeros(backing: Backing) -> None:
    pager, _ = make(backing)
    assert await pager.read(0, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
    assert pager.counters.zero_reads == 8


@pytest.mark.parametrize("offset,length", [(1, PAGE_SIZE), (0, 100), (NPAGES * PAGE_SIZE, PAGE_SIZE),
                                           (-PAGE_SIZE, PAGE_SIZE)])
async def test_unaligned_or_out_of_range_write_is_einval(backing: Backing, offset: int, length: int) -> None:
    pager, _ = make(backing)
    with pytest.raises(InvalidIO):
        await pager.write(offset, bytes(length))


async def test_read_at_end_is_short(backing: Backing) -> None:
    pager, _ = make(backing)
    assert await pager.read(NPAGES * PAGE_SIZE, PAGE_SIZE) == b""
    assert len(await pager.read((NPAGES - 1) * PAGE_SIZE, 4 * PAGE_SIZE)) == PAGE_SIZE
    with pytest.raises(InvalidIO):
        await pager.read(100, PAGE_SIZE)


async def test_refuse_every_nth_page_random_io(backing: Backing) -> None:
    pager, store = make(backing)
    store.refuse_every = 3
    rng = random.Random(1)
    truth: dict[int, int] = {}
    for version in range(1, 400):
        first = rng.randrange(NPAGES)
        n = rng.randint(1, min(16, NPAGES - first))
        await pager.write(first * PAGE_SIZE, b"".join(page(first + i, version) for i in range(n)))
        truth.update({first + i: version for i in range(n)})
    for p in range(NPAGES):
        expected = page(p, truth[p]) if p in truth else bytes(PAGE_SIZE)
        assert await pager.read(p * PAGE_SIZE, PAGE_SIZE) == expected, p
    # Whole-device read mixing host, backing and unwritten pages.
    whole = await pager.read(0, NPAGES * PAGE_SIZE)
    assert whole == b"".join(page(p, truth[p]) if p in truth else bytes(PAGE_SIZE) for p in range(NPAGES))
    c = pager.counters
    assert c.host_writes > 0 and c.backing_writes > 0
    assert c.refused_pressure == c.fallback_refused == c.backing_writes
    assert pager.map.counts()["host"] == store.store.stats()["pages_stored"]


async def test_refused_new_version_is_never_stale(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    assert pager.map.get(0) == HOST
    store.pressure = 99.0  # the store now refuses everything
    await pager.write(0, page(0, 2))
    assert pager.map.get(0) == BACKING
    assert await pager.read(0, PAGE_SIZE) == page(0, 2)
    assert pager.counters.stale_dropped == 1
    assert store.store.stats()["pages_stored"] == 0  # the store dropped version 1 too


async def test_capacity_overflow_goes_to_backing(backing: Backing) -> None:
    pager, store = make(backing, capacity=10)
    await pager.write(0, b"".join(page(i, 1) for i in range(32)))
    assert pager.map.counts() == {"host": 10, "backing": 22, "unwritten": NPAGES - 32}
    assert pager.counters.refused_capacity == 22
    assert await pager.read(0, 32 * PAGE_SIZE) == b"".join(page(i, 1) for i in range(32))


async def test_slow_store_falls_back_within_the_timeout(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, write_timeout=0.5)
    store.delay = 10.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        start = trio.current_time()
        await pager.write(0, page(0, 1) * 1)
        assert trio.current_time() - start == pytest.approx(0.5)
        assert pager.map.get(0) == BACKING and pager.counters.fallback_timeout == 1
        assert await pager.read(0, PAGE_SIZE) == page(0, 1)
        # The stalled put lands later; the orphan invalidation then removes it from the store.
        await trio.sleep(30)
        assert pager.counters.orphan_invalidations == 1
        assert store.store.stats()["pages_stored"] == 0
        nursery.cancel_scope.cancel()


async def test_timed_out_old_version_never_hides_a_newer_one(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, write_timeout=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        store.delay = 10.0
        await pager.write(0, page(0, 1))  # times out, lands in the store late
        store.delay = 0.0
        await pager.write(0, page(0, 2))  # accepted at once
        await trio.sleep(30)  # the late v1 put and the orphan invalidation both arrive now
        assert pager.map.get(0) == HOST
        assert await pager.read(0, PAGE_SIZE) == page(0, 2)
        nursery.cancel_scope.cancel()


async def test_unreachable_store_writes_go_to_backing(backing: Backing) -> None:
    pager, store = make(backing)
    store.disconnect()
    await pager.write(4 * PAGE_SIZE, page(4, 1) + page(5, 1))
    assert pager.counters.fallback_unreachable == 2 and pager.map.counts()["backing"] == 2
    assert await pager.read(4 * PAGE_SIZE, 2 * PAGE_SIZE) == page(4, 1) + page(5, 1)


async def test_old_copy_rewritten_during_an_outage_leaves_the_store(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1) + page(1, 1))
    store.disconnect()
    await pager.write(0, page(0, 2))  # to the backing file; the store still holds version 1
    assert store.store.stats()["pages_stored"] == 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        store.reconnect()
        with trio.fail_after(5):
            while store.store.stats()["pages_stored"] != 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 2) + page(1, 1)  # page 1 untouched


async def test_connection_lost_during_put_falls_back(backing: Backing) -> None:
    pager, store = make(backing)
    store.drop_connection_in_call = True
    await pager.write(0, page(0, 1))
    assert pager.counters.fallback_unreachable == 1
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)


async def test_read_waits_for_reconnect(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, read_timeout=5.0)
    await pager.write(0, page(0, 1))
    store.disconnect()
    async with trio.open_nursery() as nursery:
        async def come_back() -> None:
            await trio.sleep(2)
            store.reconnect()

        nursery.start_soon(come_back)
        assert await pager.read(0, PAGE_SIZE) == page(0, 1)


async def test_read_from_a_gone_store_is_eio_not_zeros(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, read_timeout=5.0)
    await pager.write(0, page(0, 1))
    store.disconnect()
    start = trio.current_time()
    with pytest.raises(PageUnavailable):
        await pager.read(0, PAGE_SIZE)
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_page_the_store_lost_is_eio(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1) + page(1, 1))
    store.store.invalidate(store.client, 1, 1, 10**9)  # e.g. the store restarted
    with pytest.raises(PageUnavailable):
        await pager.read(0, 2 * PAGE_SIZE)
    assert pager.counters.read_failures == 1
