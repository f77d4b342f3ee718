"""A put of pages none of which is stored is taken as one run (``Store._take_whole``,
``ClientPages.add_run``): whatever the puts, the store ends as a store deciding page by
page does — statuses, counters, versions, data, the LRU order, the shared layout the
client reads — and a run that fails half-way leaves nothing behind."""

from __future__ import annotations

import os
from array import array

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoststore.clientpages import NIL, ClientPages
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.slab import PageIndex
from hoststore.store import Store, get_answer
from pagewire.access import IN_PROCESS
from pagewire.messages import PAGE_SIZE, PROTOCOL_VERSION, ROLE_PAGER, Hello, PageStatus
from pagewire.sharedmem import SharedPages

NPAGES = 256


class PageByPage(Store):
    """The reference: every put decided a page at a time."""

    def _take_whole(self, *args: object) -> bool:
        return False


def data(first: int, n: int, seq: int) -> bytes:
    return b"".join((first + i).to_bytes(4, "little") * 512 + seq.to_bytes(4, "little") * 512 for i in range(n))


def make(kind: type[Store], capacity: int, quota: int | None, shared: bool) -> tuple[Store, ClientPages]:
    store = kind(Limits(capacity_pages=capacity, quota_pages=quota), Sampler(0, source=lambda: Snapshot.fake(5.0)),
                 clock=lambda: 1000.0)
    hello = Hello(PROTOCOL_VERSION, "c", ROLE_PAGER, NPAGES * PAGE_SIZE, "i", b"c" * 16, None, shared=shared)
    client, _, _ = store.attach(hello, b"s" * 16, can_share=shared, owner=IN_PROCESS)
    assert client is not None and (client.shared is not None) == shared
    store.bind(client, object())
    return store, client


def lru(c: ClientPages) -> list[tuple[int, int]]:
    out, slot = [], c.head
    while slot != NIL:
        out.append((c.page_of[slot], c.seq_of[slot]))
        slot = c.next[slot]
    return out


async def contents(store: Store, c: ClientPages) -> list[tuple[int, int, bytes]]:
    answer = await get_answer(store, c, array("Q", range(NPAGES)))
    return [(p, answer.seqs[p], bytes(answer.data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]))
            for p in range(NPAGES) if answer.statuses[p] == PageStatus.STORED]


def shared_reads(c: ClientPages) -> dict[int, bytes]:
    shared = c.shared
    if shared is None:
        return {}
    reader = SharedPages(os.dup(shared.fd), shared.layout)
    out = {}
    buf = memoryview(bytearray(PAGE_SIZE))
    for slot in range(c.count):
        if reader.read(c.page_of[slot], c.seq_of[slot], buf):
            out[c.page_of[slot]] = bytes(buf)
    return out


OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "put", "invalidate"]), st.integers(0, NPAGES - 1),
                         st.integers(1, 64)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, capacity=st.integers(8, 300), quota=st.one_of(st.none(), st.integers(4, 200)), shared=st.booleans())
def test_runs_end_as_page_by_page_does(ops: list[tuple[str, int, int]], capacity: int, quota: int | None,
                                       shared: bool) -> None:
    trio.run(_compare, ops, capacity, quota, shared)


async def _compare(ops: list[tuple[str, int, int]], capacity: int, quota: int | None, shared: bool) -> None:
    fast, fc = make(Store, capacity, quota, shared)
    slow, sc = make(PageByPage, capacity, quota, shared)
    try:
        await _run_both(ops, fast, fc, slow, sc)
    finally:
        fast.close()
        slow.close()


async def _run_both(ops: list[tuple[str, int, int]], fast: Store, fc: ClientPages, slow: Store,
                    sc: ClientPages) -> None:
    for seq, (op, first, n) in enumerate(ops, start=1):
        n = min(n, NPAGES - first)
        if op == "put":
            a = await fast.put(fc, first, seq, data(first, n, seq))
            b = await slow.put(sc, first, seq, data(first, n, seq))
        else:
            a = await fast.invalidate(fc, first, n, seq)
            b = await slow.invalidate(sc, first, n, seq)
        assert a == b
        fc.check()
        assert lru(fc) == lru(sc)
        assert fast.pages == slow.pages and dict(fast.counters.as_dict()) == dict(slow.counters.as_dict())
    assert await contents(fast, fc) == await contents(slow, sc)
    reads = shared_reads(fc)
    assert reads == shared_reads(sc)
    assert all(reads[p] == data(p, 1, fc.seq_of[fc.index.get(p)]) for p in reads)


async def test_a_run_that_fails_half_way_leaves_nothing_and_the_put_goes_page_by_page(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, fc = make(Store, 100, None, True)
    slow, sc = make(PageByPage, 100, None, True)
    try:
        for store, c in ((fast, fc), (slow, sc)):
            await store.put(c, 0, 1, data(0, 8, 1))
        real = PageIndex.set_new_run

        def fail_half_way(self: PageIndex, first: int, n: int, slot: int) -> None:
            real(self, first, n // 2, slot)
            raise MemoryError("no memory for the index")

        monkeypatch.setattr(PageIndex, "set_new_run", fail_half_way)
        assert await fast.put(fc, 20, 2, data(20, 10, 2)) == await slow.put(sc, 20, 2, data(20, 10, 2))
        fc.check()
        assert lru(fc) == lru(sc) and await contents(fast, fc) == await contents(slow, sc)
        assert shared_reads(fc) == shared_reads(sc) and len(shared_reads(fc)) == 18
    finally:
        fast.close()
        slow.close()


def test_a_failed_run_leaves_no_trace_a_reader_could_take(monkeypatch: pytest.MonkeyPatch) -> None:
    from hoststore.slab import SlabFull

    c = ClientPages("c", 64, "i", b"s" * 32, shared_slots=64)
    try:
        c.add_run(0, 1, memoryview(data(0, 4, 1)), 4, 1)
        real = PageIndex.set_new_run

        def fail_half_way(self: PageIndex, first: int, n: int, slot: int) -> None:
            real(self, first, n // 2, slot)
            raise MemoryError("no memory for the index")

        monkeypatch.setattr(PageIndex, "set_new_run", fail_half_way)
        with pytest.raises(SlabFull):
            c.add_run(10, 2, memoryview(data(10, 6, 2)), 6, 2)
        c.check()
        assert c.count == 4 and sorted(shared_reads(c)) == [0, 1, 2, 3]
        shared = c.shared
        assert shared is not None
        headers = shared._headers  # what a reader looks at: the run's slots and pages are clear
        assert all(headers[2 * slot] == 0 for slot in range(4, 10))
        assert all(shared._index[page] == 0 for page in range(10, 16))
        assert c.index.nbytes == 1024  # no index block left behind for the failed run's pages
    finally:
        c.slab.close()


def test_a_private_run_across_chunks_lands_in_every_slot() -> None:
    c = ClientPages("c", 64, "i", b"s" * 32)
    c.slab.chunk_pages = 4
    try:
        c.add_run(0, 1, memoryview(data(0, 3, 1)), 3, 1)
        c.add_run(20, 2, memoryview(data(20, 10, 2)), 10, 2)  # slots 3..12: across three chunks
        c.check()
        assert [p for p, _ in lru(c)] == [*range(29, 19, -1), 2, 1, 0]
        for slot in range(13):
            page, seq = c.page_of[slot], c.seq_of[slot]
            assert bytes(c.slab.view(slot)) == data(page, 1, seq)
    finally:
        c.slab.close()


async def test_a_put_of_new_pages_is_one_run_and_a_rewrite_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = ClientPages.add_run

    def spy(self: ClientPages, first: int, seq: int, pages: memoryview | None, n: int, stamp: int) -> None:
        real(self, first, seq, pages, n, stamp)
        calls.append(n)  # only runs that went in

    monkeypatch.setattr(ClientPages, "add_run", spy)
    store, c = make(Store, 100, None, True)
    try:
        await store.put(c, 0, 1, data(0, 8, 1))
        await store.put(c, 4, 2, data(4, 8, 2))  # pages 4..7 are stored: page by page
        assert calls == [8]
        assert [p for p, _ in lru(c)][:8] == [11, 10, 9, 8, 7, 6, 5, 4]
    finally:
        store.close()


def test_a_run_past_the_shared_slots_changes_nothing() -> None:
    from hoststore.slab import SlabFull

    c = ClientPages("c", 64, "i", b"s" * 32, shared_slots=8)
    assert c.shared is not None
    try:
        c.add_run(0, 1, memoryview(data(0, 6, 1)), 6, 1)
        with pytest.raises(SlabFull):
            c.add_run(10, 2, memoryview(data(10, 3, 2)), 3, 2)
        c.check()
        assert c.count == 6 and [p for p, _ in lru(c)] == [5, 4, 3, 2, 1, 0]
        assert sorted(shared_reads(c)) == list(range(6))
    finally:
        c.slab.close()


def test_a_run_is_never_taken_into_a_compressed_slab() -> None:
    from pagewire.codec import Codec

    c = ClientPages("c", 64, "i", b"s" * 32, shared_slots=8, compress=Codec.LZ4)
    try:
        with pytest.raises(TypeError):
            c.add_run(0, 1, memoryview(data(0, 2, 1)), 2, 1)
        assert c.count == 0
    finally:
        c.slab.close()
