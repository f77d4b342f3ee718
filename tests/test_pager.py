"""The page rules, against a fake store that refuses, stalls, disconnects, dies and lies."""

from __future__ import annotations

import math
import os
import random

import pytest
import trio

from pagewire.messages import PAGE_SIZE, HandBackCause
from vswapfs.backing import Backing
from vswapfs.pagemap import BACKING, HOST, LOST
from vswapfs.pager import InvalidIO, Pager, PageUnavailable, WriteFailed

from .conftest import poke
from .fakestore import FakeStore

NPAGES = 256


def page(n: int, version: int) -> bytes:
    """A page naming its number and version, not same-filled (its last word differs)."""
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8 - 1) + b"not same"


@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), NPAGES * PAGE_SIZE)
    yield b
    b.close()


def make(backing: Backing, capacity: int | None = None, **kw) -> tuple[Pager, FakeStore]:
    store = FakeStore(NPAGES, capacity)
    return Pager(backing, store, write_timeout=kw.get("write_timeout", 1.0),
                 read_timeout=kw.get("read_timeout", 5.0), writethrough=kw.get("writethrough", False),
                 pressure_holdoff=kw.get("pressure_holdoff", 1.0)), store


def stat(pager: Pager, name: str) -> int:
    return pager.stats()[name]


async def test_unwritten_pages_read_as_zeros(backing: Backing) -> None:
    pager, _ = make(backing)
    assert await pager.read(0, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
    assert stat(pager, "zero_reads") == 8


@pytest.mark.parametrize("offset,length", [(1, PAGE_SIZE), (0, 100), (NPAGES * PAGE_SIZE, PAGE_SIZE),
                                           (-PAGE_SIZE, PAGE_SIZE)])
async def test_unaligned_or_out_of_range_write_is_einval(backing: Backing, offset: int, length: int) -> None:
    pager, _ = make(backing)
    with pytest.raises(InvalidIO):
        await pager.write(offset, bytes(length))


async def test_read_at_or_past_the_end_is_short(backing: Backing) -> None:
    pager, _ = make(backing)
    assert await pager.read(NPAGES * PAGE_SIZE, PAGE_SIZE) == b""
    assert await pager.read((NPAGES + 5) * PAGE_SIZE, PAGE_SIZE) == b""
    assert len(await pager.read((NPAGES - 1) * PAGE_SIZE, 4 * PAGE_SIZE)) == PAGE_SIZE
    with pytest.raises(InvalidIO):
        await pager.read(100, PAGE_SIZE)


@pytest.mark.parametrize("holdoff", [0.0, 0.002, 1.0])
async def test_refuse_every_nth_page_random_io(backing: Backing, holdoff: float) -> None:
    """A third of the pages refused for pressure, at random places in random writes,
    every page read back as last written; with a hold-off, a single page refused
    (a whole batch) sends what follows straight to the backing file for a while."""
    pager, store = make(backing, pressure_holdoff=holdoff)
    store.refuse_every = 3
    rng = random.Random(1)
    truth: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)  # old copies of pages held off go from the store
        for version in range(1, 400):
            first = rng.randrange(NPAGES)
            n = rng.randint(1, min(16, NPAGES - first))
            await pager.write(first * PAGE_SIZE, b"".join(page(first + i, version) for i in range(n)))
            truth.update({first + i: version for i in range(n)})
        while pager.orphans_pending:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for p in range(NPAGES):
        expected = page(p, truth[p]) if p in truth else bytes(PAGE_SIZE)
        assert await pager.read(p * PAGE_SIZE, PAGE_SIZE) == expected, p
    whole = await pager.read(0, NPAGES * PAGE_SIZE)
    assert whole == b"".join(page(p, truth[p]) if p in truth else bytes(PAGE_SIZE) for p in range(NPAGES))
    s = pager.stats()
    assert s["host_writes"] > 0 and s["backing_writes"] > 0
    assert s["refused_pressure"] == s["fallback_refused"]
    assert s["backing_writes"] == s["fallback_refused"] + s["fallback_held_off"]
    if holdoff == 0:
        assert s["fallback_held_off"] == 0
    elif holdoff >= 1:  # the whole run is shorter: once held off, never offered again
        assert s["fallback_held_off"] > 0
    # 2 ms: offers resume between hold-offs (whether one happens depends on the machine's pace)
    assert s["pages_host"] == store.pages_stored and s["checksum_errors"] == 0


async def test_refused_new_version_is_never_stale(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    assert pager.map.get(0) == HOST
    store.pressure = 99.0  # the store now refuses everything
    await pager.write(0, page(0, 2))
    assert pager.map.get(0) == BACKING
    assert await pager.read(0, PAGE_SIZE) == page(0, 2)
    assert stat(pager, "stale_dropped") == 1
    assert store.pages_stored == 0  # the store dropped version 1 too


async def test_capacity_overflow_goes_to_backing(backing: Backing) -> None:
    pager, _ = make(backing, capacity=10)
    await pager.write(0, b"".join(page(i, 1) for i in range(32)))
    counts = pager.map.counts()
    assert (counts["host"], counts["backing"]) == (10, 22)
    assert stat(pager, "refused_capacity") == 22
    assert await pager.read(0, 32 * PAGE_SIZE) == b"".join(page(i, 1) for i in range(32))


async def test_slow_store_falls_back_and_the_late_put_is_dropped(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, write_timeout=0.5)
    store.latency = 10.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        start = trio.current_time()
        await pager.write(0, page(0, 1))
        assert trio.current_time() - start == pytest.approx(0.5)
        assert pager.map.get(0) == BACKING and stat(pager, "fallback_timeout") == 1
        assert await pager.read(0, PAGE_SIZE) == page(0, 1)
        # The put really reaches the store at t=10 ...
        await trio.sleep(10)
        assert store.store.counters["put_requests"] == 1  # type: ignore[index]
        # ... and the orphan invalidation, queued behind it, removes it.
        await trio.sleep(20)
        assert stat(pager, "orphan_invalidations") == 1 and store.pages_stored == 0
        nursery.cancel_scope.cancel()


async def test_timed_out_old_version_never_hides_a_newer_one(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, write_timeout=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        store.stalled = True
        await pager.write(0, page(0, 1))  # times out: to the backing file, still on the wire
        store.release()  # v1 lands, then its invalidation
        await trio.sleep(1)
        await pager.write(0, page(0, 2))  # accepted at once
        await trio.sleep(30)
        assert pager.map.get(0) == HOST and store.pages_stored == 1
        assert await pager.read(0, PAGE_SIZE) == page(0, 2)
        nursery.cancel_scope.cancel()


async def test_unreachable_store_writes_go_to_backing(backing: Backing) -> None:
    pager, store = make(backing)
    store.disconnect()
    await pager.write(4 * PAGE_SIZE, page(4, 1) + page(5, 1))
    assert stat(pager, "fallback_unreachable") == 2 and pager.map.counts()["backing"] == 2
    assert await pager.read(4 * PAGE_SIZE, 2 * PAGE_SIZE) == page(4, 1) + page(5, 1)


async def test_old_copy_rewritten_during_an_outage_leaves_the_store(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1) + page(1, 1))
    store.disconnect()
    await pager.write(0, page(0, 2))  # to the backing file; the store still holds version 1
    assert store.pages_stored == 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        store.reconnect()
        with trio.fail_after(5):
            while store.pages_stored != 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 2) + page(1, 1)  # page 1 untouched


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


async def test_a_page_the_store_does_not_hold_is_lost_and_fails_fast(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1) + page(1, 1))

    await store.store.invalidate(store.client, 1, 1, 10**9)  # the store forgot page 1
    with pytest.raises(PageUnavailable):
        await pager.read(0, 2 * PAGE_SIZE)
    assert pager.map.get(1) == LOST and stat(pager, "pages_lost") == 1
    store.disconnect()  # a read of a lost page does not even ask
    with pytest.raises(PageUnavailable):
        await pager.read(PAGE_SIZE, PAGE_SIZE)
    assert stat(pager, "lost_reads") == 1
    store.reconnect()
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)  # the other page works
    await pager.write(PAGE_SIZE, page(1, 2))  # rewriting makes it good again
    assert await pager.read(PAGE_SIZE, PAGE_SIZE) == page(1, 2)


async def test_store_death_loses_exactly_its_pages(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing, capacity=4)
    await pager.write(0, b"".join(page(i, 1) for i in range(8)))  # 0-3 in the store, 4-7 in backing
    store.kill()
    store.reconnect()
    assert stat(pager, "pages_lost") == 4 and pager.map.counts()["lost_now"] == 4
    for p in range(8):
        if p < 4:
            with pytest.raises(PageUnavailable):
                await pager.read(p * PAGE_SIZE, PAGE_SIZE)
        else:
            assert await pager.read(p * PAGE_SIZE, PAGE_SIZE) == page(p, 1)


async def test_writethrough_loses_nothing_when_the_store_dies(backing: Backing) -> None:
    pager, store = make(backing, capacity=4, writethrough=True)
    await pager.write(0, b"".join(page(i, 1) for i in range(8)))
    assert pager.map.counts()["host_and_backing"] == 4 and pager.map.counts()["backing"] == 4
    assert await pager.read(0, PAGE_SIZE) == page(0, 1) and stat(pager, "host_reads") == 1
    store.kill()
    store.reconnect()
    assert stat(pager, "pages_lost") == 0
    assert await pager.read(0, 8 * PAGE_SIZE) == b"".join(page(i, 1) for i in range(8))


async def test_writethrough_reads_the_backing_file_when_the_store_is_down_or_lies(backing: Backing) -> None:
    pager, store = make(backing, writethrough=True)
    await pager.write(0, page(0, 1) + page(1, 1))
    store.disconnect()
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 1) + page(1, 1)  # at once, no waiting
    store.reconnect()
    store.lie = "data"
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)
    assert stat(pager, "checksum_errors") == 1 and stat(pager, "writethrough_backing_reads") == 3


@pytest.mark.parametrize("lie", ["data", "seq"])
async def test_a_lying_store_gives_eio_never_wrong_data(backing: Backing, lie: str) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    store.lie = lie
    with pytest.raises(PageUnavailable):
        await pager.read(0, PAGE_SIZE)
    assert stat(pager, "checksum_errors") == 1 and pager.map.get(0) == HOST
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)  # an honest answer is fine again


async def test_a_damaged_backing_page_is_eio(backing: Backing) -> None:
    pager, store = make(backing)
    store.pressure = 99.0
    await pager.write(0, page(0, 1) + page(1, 1))
    poke(backing.path, PAGE_SIZE + 7, b"X")  # behind the pager's back
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)
    with pytest.raises(PageUnavailable):
        await pager.read(PAGE_SIZE, PAGE_SIZE)
    assert stat(pager, "checksum_errors") == 1


async def test_hand_back_moves_pages_to_the_backing_file(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(page(i, 1) for i in range(10)))
    freed = await store.hand_back(6)
    assert freed == 6 and store.pages_stored == 4
    counts = pager.map.counts()
    assert (counts["host"], counts["backing"]) == (4, 6)
    assert await pager.read(0, 10 * PAGE_SIZE) == b"".join(page(i, 1) for i in range(10))
    assert stat(pager, "handback_taken") == 6


async def test_hand_back_of_a_page_rewritten_meanwhile_changes_nothing(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    hb = await store.store.lend(store.client, HandBackCause.DRAIN, 10)
    await pager.write(0, page(0, 2))  # replaces the lent version in the store
    statuses = await pager.take_back(hb)
    assert list(statuses) == [1]  # NOT_NEEDED
    store.store.settle(store.client, hb, statuses)
    assert pager.map.get(0) == HOST and store.pages_stored == 1
    assert await pager.read(0, PAGE_SIZE) == page(0, 2)


async def test_hand_back_with_bad_data_is_refused(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    hb = await store.store.lend(store.client, HandBackCause.DRAIN, 10)
    from pagewire.messages import HandBack

    forged = HandBack(hb.cause, hb.pages, hb.seqs, page(0, 666))
    statuses = await pager.take_back(forged)
    assert list(statuses) == [1] and stat(pager, "checksum_errors") == 1
    assert pager.map.get(0) == LOST  # its only good copy was the store's, which is bad
    assert backing.size and stat(pager, "backing_writes") == 0


async def test_a_failing_backing_file_fails_the_write_and_marks_the_pages(backing: Backing, monkeypatch) -> None:
    pager, store = make(backing)
    store.pressure = 99.0

    async def broken(parts):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backing, "write_many", broken)
    with pytest.raises(WriteFailed):
        await pager.write(0, page(0, 1))
    assert pager.map.get(0) == LOST and stat(pager, "backing_write_errors") == 1
    with pytest.raises(PageUnavailable):
        await pager.read(0, PAGE_SIZE)


async def test_hand_back_with_a_failing_backing_file_keeps_the_pages_in_the_store(backing: Backing,
                                                                                   monkeypatch) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))

    async def broken(parts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backing, "write_many", broken)
    assert await store.hand_back() == 0
    assert store.pages_stored == 1 and pager.map.get(0) == HOST
    assert stat(pager, "handback_failed") == 1
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)


async def test_a_put_accepted_by_a_store_that_died_before_the_write_ended_goes_to_backing(
        backing: Backing) -> None:
    pager, store = make(backing)
    store.die_after_next_answer = True  # answers STORED, then dies and is replaced at once
    await pager.write(0, page(0, 1))
    assert store.instances == 2 and store.pages_stored == 0
    assert pager.map.get(0) == BACKING and stat(pager, "fallback_store_lost") == 1
    assert stat(pager, "pages_lost") == 0
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)


async def test_store_lost_while_the_refused_pages_are_written_keeps_the_accepted_ones(backing: Backing,
                                                                                     monkeypatch) -> None:
    """Review finding: the store restarted during the backing write of a half-refused
    batch; the accepted page was recorded in a store that no longer had it."""
    pager, store = make(backing, capacity=1)  # room for one page: a 2-page write is half refused
    real_write_many = backing.write_many

    async def dying_write_many(parts):
        store.kill()
        store.reconnect()  # a new store instance, while we write the refused page
        await real_write_many(parts)

    monkeypatch.setattr(backing, "write_many", dying_write_many)
    await pager.write(0, page(0, 1) + page(1, 1))
    monkeypatch.setattr(backing, "write_many", real_write_many)
    assert pager.map.get(0) == BACKING and stat(pager, "fallback_store_lost") == 1
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 1) + page(1, 1)


def puts(store: FakeStore) -> int:
    """Put requests the store has served."""
    return store.store.counters["put_requests"]  # type: ignore[index]


async def test_a_store_refusing_a_whole_batch_for_pressure_is_not_offered_pages_for_a_while(
        backing: Backing, autojump_clock) -> None:
    """Under pressure the store refuses every page; offering each batch anyway costs both
    daemons a round trip that ends the same way (the VM's machine-wide pressure runs,
    docs/pressure.md).  After a whole batch is refused for pressure, batches go straight
    to the backing file for --pressure-holdoff; an old copy the store holds of a page
    written meanwhile is dropped all the same; then offers resume."""
    pager, store = make(backing, pressure_holdoff=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        await pager.write(0, page(0, 1))
        assert pager.map.get(0) == HOST and puts(store) == 1
        store.pressure = 99.0
        await pager.write(PAGE_SIZE, page(1, 1))
        assert pager.map.get(1) == BACKING and puts(store) == 2 and stat(pager, "refused_pressure") == 1
        store.pressure = 10.0  # the store would take pages again, but it is not asked yet
        await pager.write(0, page(0, 2) + page(1, 2))
        assert puts(store) == 2 and stat(pager, "fallback_held_off") == 2
        assert pager.map.get(0) == BACKING and pager.map.get(1) == BACKING
        assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 2) + page(1, 2)
        while pager.orphans_pending:
            await trio.sleep(0.01)
        assert store.pages_stored == 0  # page 0's old copy is gone from the store
        await trio.sleep(1.0)
        await pager.write(2 * PAGE_SIZE, page(2, 1))
        assert pager.map.get(2) == HOST and puts(store) == 3 and stat(pager, "fallback_held_off") == 2
        assert await pager.read(0, 3 * PAGE_SIZE) == page(0, 2) + page(1, 2) + page(2, 1)
        nursery.cancel_scope.cancel()


async def test_a_batch_refused_in_part_or_a_holdoff_of_zero_keeps_every_batch_offered(
        backing: Backing, autojump_clock) -> None:
    """Only a batch refused whole for pressure holds offers off, and only while
    --pressure-holdoff is above 0."""
    pager, store = make(backing, pressure_holdoff=1.0)
    store.refuse_every = 2  # half of each batch refused for pressure
    await pager.write(0, page(0, 1) + page(1, 1))
    await pager.write(2 * PAGE_SIZE, page(2, 1) + page(3, 1))
    assert puts(store) == 2 and stat(pager, "fallback_held_off") == 0
    pager, store = make(backing, pressure_holdoff=0.0)
    store.pressure = 99.0
    for n in range(3):
        await pager.write(n * PAGE_SIZE, page(n, 1))
    assert puts(store) == 3 and stat(pager, "refused_pressure") == 3 and stat(pager, "fallback_held_off") == 0


async def test_a_new_store_is_offered_pages_at_once_after_an_old_one_said_pressure(
        backing: Backing, autojump_clock) -> None:
    """The hold-off is the old store's pressure: a store that came back without our
    pages (a new instance) is offered the next batch, not held off."""
    pager, store = make(backing, pressure_holdoff=10.0)
    store.pressure = 99.0
    await pager.write(0, page(0, 1))
    assert stat(pager, "refused_pressure") == 1
    store.pressure = 10.0
    store.kill()
    store.reconnect()
    await pager.write(PAGE_SIZE, page(1, 1))
    assert pager.map.get(1) == HOST and stat(pager, "fallback_held_off") == 0
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 1) + page(1, 1)


@pytest.mark.parametrize("holdoff", [-1.0, math.inf, math.nan])
def test_a_hold_off_that_is_not_a_finite_time_is_refused(backing: Backing, holdoff: float) -> None:
    with pytest.raises(ValueError, match="pressure_holdoff"):
        make(backing, pressure_holdoff=holdoff)
