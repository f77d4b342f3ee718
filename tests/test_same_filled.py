"""Same-filled pages (every 8-byte word equal, zero pages included), as zram keeps
them: the page map holds the fill word; neither the store nor the backing file
ever sees the page."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

from pagewire.messages import PAGE_SIZE, HandBackCause, TakeStatus
from vswapfs.backing import Backing
from vswapfs.pagemap import BACKING, HOST, HOST_WT, SAME, UNWRITTEN
from vswapfs.pager import Pager

from .conftest import poke
from .fakestore import FakeStore
from .test_pager import NPAGES, make, page, stat

ZERO = bytes(PAGE_SIZE)
ONES = b"\xff" * PAGE_SIZE
FILL = b"\x01\x02\x03\x04\x05\x06\x07\x08" * (PAGE_SIZE // 8)


def fill(word: bytes) -> bytes:
    return word * (PAGE_SIZE // 8)


def backing_page(backing: Backing, p: int) -> bytes:
    out = bytearray(PAGE_SIZE)
    backing.pread_into(p * PAGE_SIZE, memoryview(out))
    return bytes(out)


def puts(store: FakeStore) -> int:
    return store.store.counters["put_requests"]  # type: ignore[index]


def invalidates(store: FakeStore) -> int:
    return store.store.counters["invalidate_requests"]  # type: ignore[index]


@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), NPAGES * PAGE_SIZE)
    yield b
    b.close()


@pytest.fixture
async def orphan_task() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def settled(pager: Pager) -> None:
    with trio.fail_after(5):
        while pager.orphans_pending:
            await trio.sleep(0.01)


@pytest.mark.parametrize("writethrough", [False, True])
@pytest.mark.parametrize("data", [ZERO, ONES, FILL], ids=["zero", "ones", "fill"])
async def test_a_same_filled_page_round_trips_through_the_map_alone(backing: Backing, data: bytes,
                                                                    writethrough: bool) -> None:
    pager, store = make(backing, writethrough=writethrough)
    poke(backing.path, 5 * PAGE_SIZE, b"old bytes the map never points at")
    await pager.write(5 * PAGE_SIZE, data)
    assert pager.map.get(5) == SAME
    assert await pager.read(5 * PAGE_SIZE, PAGE_SIZE) == data
    s = pager.stats()
    assert (s["same_filled_writes"], s["same_filled_reads"], s["pages_same_filled"]) == (1, 1, 1)
    assert (s["host_writes"], s["backing_writes"], s["host_reads"], s["backing_reads"]) == (0, 0, 0, 0)
    assert puts(store) == 0 and store.pages_stored == 0 and invalidates(store) == 0
    assert backing_page(backing, 5).startswith(b"old bytes")  # not written, in either mode


async def test_an_all_same_filled_batch_sends_nothing_even_with_the_store_gone(backing: Backing) -> None:
    pager, store = make(backing)
    store.disconnect()
    await pager.write(0, ZERO * 8 + FILL * 8)
    s = pager.stats()
    assert s["pages_same_filled"] == 16 and s["fallback_unreachable"] == 0 and s["backing_writes"] == 0
    assert await pager.read(0, 16 * PAGE_SIZE) == ZERO * 8 + FILL * 8


async def test_a_mixed_batch_offers_only_the_other_pages_in_runs(backing: Backing) -> None:
    pager, store = make(backing, capacity=5)  # 7 pages of data: 5 accepted, 2 refused
    kinds = "ZrrZFFrZrrrrZ"  # Z zero, F fill, r a page of data
    pages = [ZERO if k == "Z" else FILL if k == "F" else page(i, 1) for i, k in enumerate(kinds)]
    await pager.write(PAGE_SIZE, b"".join(pages))
    assert puts(store) == 3  # runs 1-2, 6, 8-11 of the batch: pipelined, one request each
    counts = pager.map.counts()
    assert (counts["same_filled"], counts["host"], counts["backing"]) == (6, 5, 2)
    assert [pager.map.get(1 + i) == SAME for i in range(len(kinds))] == [k in "ZF" for k in kinds]
    s = pager.stats()
    assert s["same_filled_writes"] == 6 and s["host_writes"] == 5 and s["backing_writes"] == 2
    assert s["refused_capacity"] == 2 and store.pages_stored == 5
    for i, k in enumerate(kinds):  # the backing file holds the refused pages only
        state = pager.map.get(1 + i)
        assert backing_page(backing, 1 + i) == (pages[i] if state == BACKING else ZERO), i
    assert await pager.read(0, 15 * PAGE_SIZE) == ZERO + b"".join(pages) + ZERO
    assert stat(pager, "same_filled_reads") == 6 and stat(pager, "checksum_errors") == 0


async def test_a_mixed_batch_in_write_through(backing: Backing) -> None:
    pager, store = make(backing, writethrough=True)
    pages = [page(0, 1), ZERO, page(2, 1), FILL]
    await pager.write(0, b"".join(pages))
    assert [pager.map.get(p) for p in range(4)] == [HOST_WT, SAME, HOST_WT, SAME]
    assert stat(pager, "backing_writes") == 2 and store.pages_stored == 2
    assert [backing_page(backing, p) for p in range(4)] == [page(0, 1), ZERO, page(2, 1), ZERO]
    store.kill()
    store.reconnect()
    assert await pager.read(0, 4 * PAGE_SIZE) == b"".join(pages) and stat(pager, "pages_lost") == 0


@pytest.mark.parametrize("writethrough", [False, True])
async def test_a_stored_page_that_becomes_same_filled_leaves_the_store(backing: Backing, orphan_task,
                                                                       writethrough: bool) -> None:
    pager, store = make(backing, writethrough=writethrough)
    orphan_task.start_soon(pager.drop_orphans)
    await pager.write(0, page(0, 1) + page(1, 1) + page(2, 1))
    assert store.pages_stored == 3
    await pager.write(0, FILL + ZERO)
    assert await pager.read(0, 3 * PAGE_SIZE) == FILL + ZERO + page(2, 1)  # the map decides at once
    await settled(pager)
    assert store.pages_stored == 1 and invalidates(store) == 1  # pages 0-1 in one request
    assert stat(pager, "same_filled_store_drops") == 2 and stat(pager, "stale_dropped") == 0
    assert await pager.read(0, PAGE_SIZE) == FILL


async def test_the_late_drop_of_an_old_copy_never_drops_a_newer_version(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    await pager.write(0, ZERO)  # the drop of version 1 is queued; no orphan task runs yet
    assert pager.orphans_pending == 1 and store.pages_stored == 1
    assert await pager.read(0, PAGE_SIZE) == ZERO
    await pager.write(0, page(0, 3))  # a newer version reaches the store first
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        await settled(pager)
        nursery.cancel_scope.cancel()
    assert invalidates(store) == 1 and stat(pager, "same_filled_store_drops") == 0
    assert store.pages_stored == 1 and pager.map.get(0) == HOST
    assert await pager.read(0, PAGE_SIZE) == page(0, 3)


async def test_a_backing_page_that_becomes_same_filled_needs_no_store_request(backing: Backing) -> None:
    pager, store = make(backing)
    store.pressure = 99.0
    await pager.write(0, page(0, 1))
    assert pager.map.get(0) == BACKING
    await pager.write(0, FILL)
    assert pager.orphans_pending == 0 and invalidates(store) == 0
    assert await pager.read(0, PAGE_SIZE) == FILL


async def test_same_filled_then_data_goes_to_the_store(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, ZERO + FILL)
    await pager.write(0, page(0, 2) + page(1, 2))
    assert [pager.map.get(p) for p in range(2)] == [HOST, HOST] and store.pages_stored == 2
    assert await pager.read(0, 2 * PAGE_SIZE) == page(0, 2) + page(1, 2)
    assert stat(pager, "pages_same_filled") == 0


async def test_discarding_same_filled_pages_forgets_them(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, FILL * 3 + page(3, 1))
    await pager.discard(PAGE_SIZE, 2 * PAGE_SIZE)
    assert [pager.map.get(p) for p in range(4)] == [SAME, UNWRITTEN, UNWRITTEN, HOST]
    s = pager.stats()
    assert (s["discard_pages"], s["discard_host_pages"]) == (2, 0)
    assert invalidates(store) == 0  # nothing there was in the store
    assert await pager.read(0, 4 * PAGE_SIZE) == FILL + ZERO * 2 + page(3, 1)
    assert stat(pager, "zero_reads") == 2


async def test_a_hand_back_of_a_page_that_became_same_filled_is_not_needed(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1) + page(1, 1))
    hb = await store.store.lend(store.client, HandBackCause.PRESSURE, 10)
    await pager.write(0, ONES)  # the lent version of page 0 is stale now
    statuses = await pager.take_back(hb)
    assert list(statuses) == [TakeStatus.NOT_NEEDED, TakeStatus.TAKEN]
    store.store.settle(store.client, hb, statuses)
    assert store.pages_stored == 0 and (pager.map.get(0), pager.map.get(1)) == (SAME, BACKING)
    assert stat(pager, "handback_not_needed") == 1 and stat(pager, "backing_writes") == 1
    assert backing_page(backing, 0) == ZERO  # the old version was not written back
    assert await pager.read(0, 2 * PAGE_SIZE) == ONES + page(1, 1)


async def test_same_filled_pages_survive_the_store_losing_its_pages(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, FILL + page(1, 1))
    store.kill()
    store.reconnect()
    assert pager.map.get(0) == SAME and stat(pager, "pages_lost") == 1  # page 1 only
    assert await pager.read(0, PAGE_SIZE) == FILL


async def test_a_store_lost_while_a_later_run_is_out_does_not_keep_the_earlier_runs(backing: Backing) -> None:
    """Runs of one batch are answered at different times: if the store comes back
    without its pages meanwhile, the runs it took earlier must go to the backing file
    too, not be recorded in a store that no longer has them (write-back: its only copy)."""

    run_a_answered = trio.Event()

    class DiesDuringRunB(FakeStore):
        async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
            if first == 2:
                await run_a_answered.wait()  # run [0] is answered first...
                self.kill()  # ...then the store dies while run [2] is out
                self.reconnect()
                from vswapfs.pagestore import StoreUnavailable

                raise StoreUnavailable("gone")
            try:
                return await super().put(first, seq, data)
            finally:
                run_a_answered.set()

    store = DiesDuringRunB(NPAGES)
    pager = Pager(backing, store, write_timeout=1.0, read_timeout=0.5)
    await pager.write(0, page(0, 1) + ZERO + page(2, 1))  # runs [0] and [2]
    assert list(pager.map.states[:3]) == [BACKING, SAME, BACKING]
    assert await pager.read(0, 3 * PAGE_SIZE) == page(0, 1) + ZERO + page(2, 1)
    assert stat(pager, "fallback_store_lost") >= 1 and stat(pager, "pages_lost") == 0


async def test_a_batch_cut_into_many_runs_is_placed_whole(backing: Backing) -> None:
    pager, store = make(backing)
    data = b"".join(page(i, 1) if i % 2 else ZERO for i in range(64))  # 32 runs of one page
    await pager.write(0, data)
    assert puts(store) == 1 and stat(pager, "same_filled_writes") == 0
    assert await pager.read(0, 64 * PAGE_SIZE) == data
    data = b"".join(ZERO if i in (10, 11, 40) else page(i, 2) for i in range(64))  # 3 runs
    await pager.write(0, data)
    assert puts(store) == 1 + 3 and stat(pager, "same_filled_writes") == 3
    assert await pager.read(0, 64 * PAGE_SIZE) == data


async def test_release_at_unmount_also_clears_pending_drops(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    await pager.write(0, ZERO)  # the store's copy is to be dropped (queued: no orphan task runs)
    assert pager.orphans_pending == 1 and store.pages_stored == 1
    await pager.release_all()
    assert store.pages_stored == 0
