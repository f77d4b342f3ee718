"""Writes: each batch offered to the store, refused pages to the backing file, the map updated.

The page rules for writes (docs/architecture.md): a batch is offered whole; refused
pages reach the backing file before the write is answered; a store that is
unreachable, too slow or under pressure sends the whole batch there; pages the
store accepted but lost meanwhile are rewritten to the backing file; same-filled
pages stay in the map as their fill word.
"""

from __future__ import annotations

import logging
import re
from array import array

import trio

from pagewire.messages import MAX_BATCH_PAGES, PAGE_SIZE, PageStatus

from .drops import Drops
from .integrity import checksums
from .pagemap import BACKING, HOST, HOST_WT, LOST, SAME, STORED_TO_HOST, STORED_TO_HOST_WT, refused_runs, same_filled
from .pagercore import InvalidIO, Part, PagerCore, WriteFailed
from .pagercounters import REFUSAL_COUNTER, PagerCounter
from .pagestore import StoreError, StoreUnavailable

log = logging.getLogger("vswapfs.pager")

ALL_REFUSED = b"\xff"
_STORED = PageStatus.STORED


def _table(mapping: dict[int, int]) -> bytes:
    return bytes(mapping.get(i, i) for i in range(256))


_WT_TO_BACKING = _table({HOST_WT: BACKING})
_HOST_TO_BACKING = _table({HOST: BACKING})
_HOST_TO_LOST = _table({HOST: LOST})
_IS_HOST = bytes(1 if i == HOST else 0 for i in range(256))
_ONES = re.compile(rb"\x01+")
_TO_PLACE = re.compile(rb"\x00+")  # pages of a batch still to place (not same-filled)
MAX_RUNS = 4  # a batch that same-filled pages cut into more runs is placed whole


def _fragments(fills: dict[int, int], n: int) -> int:
    """How many runs of pages that are not same-filled a batch of ``n`` pages has."""
    marks = bytearray(n)
    for i in fills:
        marks[i] = 1
    return len(_TO_PLACE.findall(marks))


class Writer(Part):
    def __init__(self, core: PagerCore, drops: Drops) -> None:
        super().__init__(core)
        self.drops = drops

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise InvalidIO(f"I/O at {offset}+{length} is not aligned to {PAGE_SIZE} bytes")
        if offset < 0 or offset + length > self.size:
            raise InvalidIO(f"I/O at {offset}+{length} is outside the {self.size}-byte device")
        return offset // PAGE_SIZE, length // PAGE_SIZE

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        first, n = self._pages(offset, len(data))
        self.counters.add(PagerCounter.WRITE_REQUESTS)
        if not n:
            return 0
        view = memoryview(data)
        homeless = 0
        async with self.locks.exclusive(first, n):
            for start in range(0, n, MAX_BATCH_PAGES):
                count = min(MAX_BATCH_PAGES, n - start)
                chunk = view[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
                homeless += await self._write_batch(first + start, chunk)
        if homeless:
            raise WriteFailed(f"{homeless} page(s) of the write at page {first} could not be stored anywhere")
        return len(data)

    async def _write_batch(self, first: int, data: memoryview) -> int:
        """Store one batch; returns how many of its pages found no home (they are marked lost)."""
        seq = self.core.next_seq()
        fills = same_filled(data)
        if fills and _fragments(fills, len(data) // PAGE_SIZE) > MAX_RUNS:
            fills = {}  # a put per run would cost more than storing the few same-filled pages
        if fills:
            states, sums = await self._place_mixed(first, data, seq, fills)
        else:
            sums = checksums(data, first, seq)
            states = await self._place(first, data, seq)
        return self._record(first, states, seq, sums)

    async def _place_mixed(self, first: int, data: memoryview, seq: int,
                           fills: dict[int, int]) -> tuple[bytes, array]:
        """A batch with same-filled pages: they stay in the map as their fill word; the
        runs between them are placed concurrently (pipelined), so a batch costs one
        round trip however its same-filled pages split it, and none if all are."""
        n = len(data) // PAGE_SIZE
        epoch = self.store.epoch
        states = bytearray(n)
        sums = array("Q", bytes(8 * n))
        for i, word in fills.items():
            states[i] = SAME
            sums[i] = word
        self.counters.add(PagerCounter.SAME_FILLED_WRITES, len(fills))

        async def place(start: int, count: int) -> None:
            part = data[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
            sums[start : start + count] = checksums(part, first + start, seq)
            states[start : start + count] = await self._place(first + start, part, seq)

        runs = [(m.start(), m.end() - m.start()) for m in _TO_PLACE.finditer(bytes(states))]
        if len(runs) == 1:
            await place(*runs[0])
        elif runs:
            async with trio.open_nursery() as nursery:
                for start, count in runs:
                    nursery.start_soon(place, start, count)
        # A run answered early was checked against the store's epoch when it was
        # answered; the store may have lost its pages while a later run was out.
        return await self._rehome_if_store_lost(first, data, bytes(states), epoch), sums

    def _record(self, first: int, states: bytes, seq: int, sums: array) -> int:
        """Put a batch's outcome in the map; how many of its pages found no home."""
        c = self.counters
        self._drop_now_same(first, states)
        c.add(PagerCounter.HOST_WRITES, states.count(HOST) + states.count(HOST_WT))
        c.add(PagerCounter.STALE_DROPPED, self.map.record(first, states, seq, sums))
        homeless = states.count(LOST)
        if homeless:
            c.add(PagerCounter.PAGES_LOST, homeless)
        return homeless

    def _drop_now_same(self, first: int, states: bytes) -> None:
        """Pages the store holds that just became same-filled: their store copies are
        stale, so the orphan task asks the store to drop them.  The write does not wait
        for that round trip: the map reads the fill from now on, a hand-back of the old
        copy is answered NOT_NEEDED, and the fresh sequence number (newer than the old
        copy, older than any later write of these pages) keeps the drop from ever
        reaching a newer version."""
        runs = self.map.store_runs_now_same(first, states)
        if runs:
            seq = self.core.next_seq()
            for start, count in runs:
                self.drops.queue(start, count, seq, PagerCounter.SAME_FILLED_STORE_DROPS)

    async def _place(self, first: int, data: memoryview, seq: int) -> bytes:
        """Offer a run of pages to the store, refused ones to the backing file (all of them
        too in write-through mode); the new state of each page."""
        n = len(data) // PAGE_SIZE
        epoch = self.store.epoch
        c = self.counters
        if self.core.writethrough:
            backing_error: list[OSError] = []

            async def write_all() -> None:
                try:
                    await self.backing.write(first * PAGE_SIZE, data)
                except OSError as exc:
                    backing_error.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all)
                statuses = await self._offer(first, seq, data, n)
            statuses = self._check_epoch(statuses, epoch)
            if backing_error:
                self.core.backing_failed(first, n, backing_error[0])
                states = bytes(HOST if s == _STORED else LOST for s in statuses)
            else:
                states = statuses.translate(STORED_TO_HOST_WT)
                c.add(PagerCounter.BACKING_WRITES, n)
        else:
            statuses = self._check_epoch(await self._offer(first, seq, data, n), epoch)
            states = statuses.translate(STORED_TO_HOST)
            parts = [(
                (first + index) * PAGE_SIZE, data[index * PAGE_SIZE : (index + count) * PAGE_SIZE]
            ) for index, count in refused_runs(statuses)]
            if parts:
                refused = sum(len(part) for _, part in parts) // PAGE_SIZE
                try:
                    await self.backing.write_many(parts)
                except OSError as exc:
                    self.core.backing_failed(first, refused, exc)
                    states = bytes(HOST if s == _STORED else LOST for s in statuses)
                else:
                    c.add(PagerCounter.BACKING_WRITES, refused)
        return await self._rehome_if_store_lost(first, data, states, epoch)

    async def _rehome_if_store_lost(self, first: int, data: memoryview, states: bytes, epoch: int) -> bytes:
        """If the store lost its pages while this batch was being written (the refused
        pages going to the backing file), the accepted ones are still in hand: they go
        to the backing file too, instead of being recorded in a store that lacks them."""
        while self.store.epoch != epoch and (HOST in states or HOST_WT in states):
            epoch = self.store.epoch
            new = bytearray(states.translate(_WT_TO_BACKING))
            host = bytes(new).translate(_IS_HOST)
            parts = [((first + m.start()) * PAGE_SIZE, data[m.start() * PAGE_SIZE : m.end() * PAGE_SIZE])
                     for m in _ONES.finditer(host)]
            pages = sum(len(part) for _, part in parts) // PAGE_SIZE
            self.counters.add(PagerCounter.FALLBACK_STORE_LOST, pages + states.count(HOST_WT))
            try:
                if parts:
                    await self.backing.write_many(parts)
            except OSError as exc:
                self.core.backing_failed(first, pages, exc)
                new = bytearray(bytes(new).translate(_HOST_TO_LOST))
            else:
                new = bytearray(bytes(new).translate(_HOST_TO_BACKING))
                self.counters.add(PagerCounter.BACKING_WRITES, pages)
            states = bytes(new)
        return states

    def _check_epoch(self, statuses: bytes, epoch: int) -> bytes:
        """Pages accepted by a store that has since lost them have only the backing file."""
        if self.store.epoch == epoch or _STORED not in statuses:
            return statuses
        self.counters.add(PagerCounter.FALLBACK_STORE_LOST, statuses.count(_STORED))
        return ALL_REFUSED * len(statuses)

    async def _offer(self, first: int, seq: int, data: memoryview, n: int) -> bytes:
        """The store's per-page answer, or all-refused when it is unreachable or too slow."""
        if not self.store.connected:
            return self._fall_back(first, n, seq, PagerCounter.FALLBACK_UNREACHABLE)
        if trio.current_time() < self.core.held_off_until:
            return self._fall_back(first, n, seq, PagerCounter.FALLBACK_HELD_OFF)
        with trio.move_on_after(self.core.write_timeout) as scope:
            try:
                statuses = await self.store.put(first, seq, data)
            except StoreUnavailable:
                return self._fall_back(first, n, seq, PagerCounter.FALLBACK_UNREACHABLE, sent=True)
            except StoreError as exc:
                log.error("store failed a put of %d pages: %s", n, exc)
                return self._fall_back(first, n, seq, PagerCounter.FALLBACK_ERROR, sent=True)
        if scope.cancelled_caught:
            return self._fall_back(first, n, seq, PagerCounter.FALLBACK_TIMEOUT, sent=True)
        refused = n - statuses.count(_STORED)
        if self.core.pressure_holdoff and statuses.count(PageStatus.REFUSED_PRESSURE) == n:
            self.core.held_off_until = trio.current_time() + self.core.pressure_holdoff
        if refused:
            c = self.counters
            c.add(PagerCounter.FALLBACK_REFUSED, refused)
            for status, cause in REFUSAL_COUNTER.items():
                c.add(cause, statuses.count(status))
        return statuses

    def _fall_back(self, first: int, n: int, seq: int, cause: PagerCounter, sent: bool = False) -> bytes:
        """The whole batch goes to the backing file.  The store may still hold a
        copy of these pages: this version, if the put was sent (it may land
        late), or an older one the map pointed at.  Either way the orphan task
        asks the store to drop versions up to ``seq``, so nothing lingers there."""
        self.counters.add(cause, n)
        states = self.map.states[first : first + n]
        if sent or HOST in states or HOST_WT in states:
            self.drops.queue(first, n, seq, None)
        return ALL_REFUSED * n
