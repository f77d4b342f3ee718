"""The page rules (README, "The page rules"), testable without FUSE.

* A write is offered to the store as one batch; refused pages go to the
  backing file before the write returns.  With ``writethrough`` every page
  also goes to the backing file, and the store is only a cache.
* If the store is unreachable or does not answer within ``write_timeout``,
  the whole write goes to the backing file.  If it refused a whole batch for
  memory pressure, batches go straight to the backing file for
  ``pressure_holdoff`` seconds: under pressure each offer costs both daemons
  a round trip that ends the same way.  A batch that timed out may still
  be applied by the store later, so the pager then asks the store to drop
  that version; sequence numbers keep that request from ever dropping a
  newer version.
* Never stale: a page's map entry moves to the backing file whenever its
  newest version is there, and the store drops an older copy it refuses to
  replace.
* Same-filled pages (every 8-byte word equal, zero pages included), as zram
  keeps them: the map holds the fill word, and the page goes neither to the
  store nor to the backing file, in either mode; the rest of the batch is
  offered as contiguous runs.  If the store held an older version, a drop
  request is queued for it with a fresh sequence number, so it can never
  drop a newer one; until it lands, the map already reads the fill.
* A read goes where the map says, and what it returns is checked: the
  version the store names and the page's checksum must match the map's.  A
  page never written reads as zeros, a same-filled page as its fill word; a
  page that cannot be produced is an I/O error, never zeros and never another
  version.
* Pages known to be gone (the store came back without them, or says it does
  not hold them) are marked lost: reads of them fail at once, until rewritten.
* The store may hand pages back: they are checked, written to the backing
  file, and the map moves only where the version still matches.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import re
import time
from array import array
from typing import Any

import trio

from vswapcommon.counters import Counters
from pagewire.messages import MAX_BATCH_PAGES, MAX_GET_PAGES, PAGE_SIZE, HandBack, PageStatus, TakeStatus

from .backing import Backing
from .integrity import checksum, checksums
from .pagemap import (
    BACKING,
    HOST,
    HOST_WT,
    IN_STORE,
    LOST,
    SAME,
    STORED_TO_HOST,
    STORED_TO_HOST_WT,
    UNWRITTEN,
    PageMap,
    filled_page,
    refused_runs,
    same_filled,
)
from .pagestore import PageStore, StoreError, StoreUnavailable
from .rangelock import RangeLock

log = logging.getLogger("vswapfs.pager")

_ALL_REFUSED = b"\xff"
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


class PagerError(Exception):
    errno = errno.EIO


class InvalidIO(PagerError):
    """Unaligned or out-of-range I/O."""

    errno = errno.EINVAL


class PageUnavailable(PagerError):
    """A page could not be produced (lost, missing, failed its check, or the store did not answer)."""

    errno = errno.EIO


class WriteFailed(PagerError):
    """Some page of a write found no home (the backing file failed too)."""

    errno = errno.EIO


class PagerCounter(enum.StrEnum):
    """Pages unless the name says requests; the store's refusals by its reason."""

    WRITE_REQUESTS = "write_requests"
    READ_REQUESTS = "read_requests"
    HOST_WRITES = "host_writes"
    BACKING_WRITES = "backing_writes"
    HOST_READS = "host_reads"
    SHARED_READS = "shared_reads"  # of those, read straight from memory the store shares with us (no round trip)
    SHARED_RETRIES = "shared_retries"  # shared copies that failed their check (changed meanwhile): asked for
    BACKING_READS = "backing_reads"
    ZERO_READS = "zero_reads"  # never-written pages read back as zeros
    SAME_FILLED_WRITES = "same_filled_writes"  # pages kept in the map as their fill word
    SAME_FILLED_READS = "same_filled_reads"  # pages read back from their fill word
    SAME_FILLED_STORE_DROPS = "same_filled_store_drops"  # store copies dropped: their page became same-filled
    FALLBACK_REFUSED = "fallback_refused"
    FALLBACK_TIMEOUT = "fallback_timeout"
    FALLBACK_UNREACHABLE = "fallback_unreachable"
    FALLBACK_ERROR = "fallback_error"  # the store answered the batch with an error
    FALLBACK_STORE_LOST = "fallback_store_lost"  # accepted by a store that was gone before the write was done
    FALLBACK_HELD_OFF = "fallback_held_off"  # not offered: the store refused a whole batch for pressure just before
    REFUSED_PRESSURE = "refused_pressure"
    REFUSED_CAPACITY = "refused_capacity"
    REFUSED_QUOTA = "refused_quota"
    REFUSED_OUTDATED = "refused_outdated"
    REFUSED_NOMEM = "refused_nomem"
    REFUSED_DRAINING = "refused_draining"
    REFUSED_SHARE = "refused_share"
    REFUSED_POLICY = "refused_policy"
    REFUSED_POLICY_ERROR = "refused_policy_error"
    REFUSED_REPLICATION = "refused_replication"
    REFUSED_TIER = "refused_tier"
    STALE_DROPPED = "stale_dropped"  # pages whose store copy was superseded by a backing write
    ORPHAN_INVALIDATIONS = "orphan_invalidations"  # timed-out batches the store was asked to drop
    DISCARD_REQUESTS = "discard_requests"
    DISCARD_PAGES = "discard_pages"  # whole pages forgotten by the page map (they read as zeros again)
    DISCARD_HOST_PAGES = "discard_host_pages"  # of those, pages the store dropped
    IO_ERRORS = "io_errors"  # FUSE requests answered with an error
    READ_FAILURES = "read_failures"  # pages that could not be produced
    CHECKSUM_ERRORS = "checksum_errors"  # pages whose version or checksum did not match the map
    PAGES_LOST = "pages_lost"  # pages marked lost: their only copy is gone
    LOST_READS = "lost_reads"  # reads of lost pages, failed at once
    BACKING_WRITE_ERRORS = "backing_write_errors"  # pages the backing file failed to take
    WRITETHROUGH_BACKING_READS = "writethrough_backing_reads"  # cached pages read from the backing file instead
    HANDBACK_REQUESTS = "handback_requests"
    HANDBACK_TAKEN = "handback_taken"  # pages the store handed back, now in the backing file
    HANDBACK_NOT_NEEDED = "handback_not_needed"  # handed back, but the map had moved on
    HANDBACK_FAILED = "handback_failed"  # handed back, but the backing file failed: left in the store


# A drop request for the orphan task: first page, count, sequence number, and the
# counter that adds the pages dropped (None: a timed-out batch, counted per request).
_Orphan = tuple[int, int, int, PagerCounter | None]

REFUSAL_COUNTER = {
    PageStatus.REFUSED_PRESSURE: PagerCounter.REFUSED_PRESSURE,
    PageStatus.REFUSED_CAPACITY: PagerCounter.REFUSED_CAPACITY,
    PageStatus.REFUSED_QUOTA: PagerCounter.REFUSED_QUOTA,
    PageStatus.REFUSED_OUTDATED: PagerCounter.REFUSED_OUTDATED,
    PageStatus.REFUSED_NOMEM: PagerCounter.REFUSED_NOMEM,
    PageStatus.REFUSED_DRAINING: PagerCounter.REFUSED_DRAINING,
    PageStatus.REFUSED_SHARE: PagerCounter.REFUSED_SHARE,
    PageStatus.REFUSED_POLICY: PagerCounter.REFUSED_POLICY,
    PageStatus.REFUSED_POLICY_ERROR: PagerCounter.REFUSED_POLICY_ERROR,
    PageStatus.REFUSED_REPLICATION: PagerCounter.REFUSED_REPLICATION,
    PageStatus.REFUSED_TIER: PagerCounter.REFUSED_TIER,
}


def covered_pages(offset: int, length: int, npages: int) -> tuple[int, int]:
    """(first page, count) of the whole pages inside [offset, offset + length),
    clipped to the device; partial pages at either edge are not covered."""
    if offset < 0 or length <= 0:
        return 0, 0
    first = -(-offset // PAGE_SIZE)
    end = min((offset + length) // PAGE_SIZE, npages)
    return (first, end - first) if end > first else (0, 0)


class BurstLog:
    """One log line per burst: the first event logs; the rest within ``interval``
    seconds are counted and summed up by the next line."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def error(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more like it since the last report)" if self._suppressed else ""
        self.logger.error(message + more, *args)
        self._last = now
        self._suppressed = 0


class Pager:
    def __init__(
        self,
        backing: Backing,
        store: PageStore,
        *,
        write_timeout: float = 1.0,
        read_timeout: float = 30.0,
        writethrough: bool = False,
        pressure_holdoff: float = 1.0,
    ) -> None:
        self.backing = backing
        self.store = store
        self.size = backing.size
        self.npages = backing.size // PAGE_SIZE
        self.map = PageMap(self.npages)
        self.locks = RangeLock()
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        self.writethrough = writethrough
        if not 0 <= pressure_holdoff < math.inf:
            raise ValueError(f"pressure_holdoff must be a finite number of seconds, 0 or more, not {pressure_holdoff}")
        self.pressure_holdoff = pressure_holdoff
        self._held_off_until = -math.inf  # no offers before this (trio time): the store said pressure
        self.counters: Counters[PagerCounter] = Counters(PagerCounter)
        self._seq = 0
        self._orphans_send, self._orphans_recv = trio.open_memory_channel[_Orphan](math.inf)
        self.orphans_pending = 0  # drop requests the store has yet to receive
        self._bad_pages = BurstLog(log)
        self._lost_reads = BurstLog(log)
        store.set_handlers(self.take_back, self.pages_lost)

    # -- ranges -----------------------------------------------------------------

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise InvalidIO(f"I/O at {offset}+{length} is not aligned to {PAGE_SIZE} bytes")
        if offset < 0 or offset + length > self.size:
            raise InvalidIO(f"I/O at {offset}+{length} is outside the {self.size}-byte device")
        return offset // PAGE_SIZE, length // PAGE_SIZE

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- write ------------------------------------------------------------------

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
        seq = self._next_seq()
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
            seq = self._next_seq()
            for start, count in runs:
                self._queue_orphan(start, count, seq, PagerCounter.SAME_FILLED_STORE_DROPS)

    async def _place(self, first: int, data: memoryview, seq: int) -> bytes:
        """Offer a run of pages to the store, refused ones to the backing file (all of them
        too in write-through mode); the new state of each page."""
        n = len(data) // PAGE_SIZE
        epoch = self.store.epoch
        c = self.counters
        if self.writethrough:
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
                self._backing_failed(first, n, backing_error[0])
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
                    self._backing_failed(first, refused, exc)
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
                self._backing_failed(first, pages, exc)
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
        return _ALL_REFUSED * len(statuses)

    def _backing_failed(self, first: int, pages: int, exc: OSError) -> None:
        self.counters.add(PagerCounter.BACKING_WRITE_ERRORS, pages)
        log.error("backing file %s failed a write of %d page(s) at page %d: %s",
                  self.backing.path, pages, first, exc)

    async def _offer(self, first: int, seq: int, data: memoryview, n: int) -> bytes:
        """The store's per-page answer, or all-refused when it is unreachable or too slow."""
        if not self.store.connected:
            return self._fall_back(first, n, seq, PagerCounter.FALLBACK_UNREACHABLE)
        if trio.current_time() < self._held_off_until:
            return self._fall_back(first, n, seq, PagerCounter.FALLBACK_HELD_OFF)
        with trio.move_on_after(self.write_timeout) as scope:
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
        if self.pressure_holdoff and statuses.count(PageStatus.REFUSED_PRESSURE) == n:
            self._held_off_until = trio.current_time() + self.pressure_holdoff
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
            self._queue_orphan(first, n, seq, None)
        return _ALL_REFUSED * n

    def _queue_orphan(self, first: int, n: int, seq: int, dropped_counter: PagerCounter | None) -> None:
        """Ask the store (via the orphan task) to drop versions up to ``seq`` of pages
        ``first ..``; ``dropped_counter`` adds the pages it dropped (None: a timed-out
        batch, counted once per request in ORPHAN_INVALIDATIONS)."""
        self.orphans_pending += 1
        self._orphans_send.send_nowait((first, n, seq, dropped_counter))

    async def drop_orphans(self) -> None:
        """Background task: ask the store to drop batches whose put timed out,
        discards it could not take at the time, and old copies of pages that
        became same-filled.

        The store drops a page only if its stored version is not newer than
        the request's, so this can never drop a page the map points at."""
        async for first, n, seq, dropped_counter in self._orphans_recv:
            while True:
                try:
                    await self.store.wait_connected()
                    dropped = await self.store.invalidate(first, n, seq)
                    if dropped_counter is not None:
                        self.counters.add(dropped_counter, dropped)
                    else:
                        self.counters.add(PagerCounter.ORPHAN_INVALIDATIONS)
                    break
                except StoreUnavailable:
                    await trio.sleep(0.01)
                except StoreError as exc:
                    log.error("store failed to drop a timed-out batch: %s", exc)
                    break
            self.orphans_pending -= 1

    # -- read -------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read whole pages.  At or past the end of the device, reads are short."""
        if offset < 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
            raise InvalidIO(f"read at {offset}+{length} is not aligned to {PAGE_SIZE} bytes")
        if offset >= self.size or not length:
            return b""
        length = min(length, self.size - offset)
        first, n = offset // PAGE_SIZE, length // PAGE_SIZE
        self.counters.add(PagerCounter.READ_REQUESTS)
        if n == 1:
            data = self._read_one_shared(first)
            if data is not None:
                return data
        async with self.locks.shared(first, n):
            return await self._read_locked(first, n)

    def _read_one_shared(self, page: int) -> bytes | None:
        """The common random swap-in: one page the store holds, read from shared memory
        with nothing awaited, so no lock is needed (nothing else runs meanwhile) unless a
        writer holds the page now.  None: take the general path."""
        if self.map.states[page] not in IN_STORE or not self.locks.free(page, 1):
            return None
        out = bytearray(PAGE_SIZE)
        view = memoryview(out)
        seq = self.map.seqs[page]
        if not self.store.read_shared(page, seq, view) or checksum(view, page, seq) != self.map.sums[page]:
            return None  # the general path asks the store, and counts what went wrong
        c = self.counters
        c.add(PagerCounter.SHARED_READS)
        c.add(PagerCounter.HOST_READS)
        return bytes(out)

    async def _read_locked(self, first: int, n: int) -> bytes:
        states = bytes(self.map.states[first : first + n])
        if LOST in states:
            lost = states.count(LOST)
            self.counters.add(PagerCounter.LOST_READS, lost)
            self._lost_reads.error("read of %d lost page(s) at page %d failed at once", lost, first)
            raise PageUnavailable(f"{lost} page(s) at {first}.. are lost")
        out = bytearray(n * PAGE_SIZE)
        view = memoryview(out)
        from_store = array("Q")
        from_backing: list[tuple[int, int]] = []
        c = self.counters
        for state, start, count in self.map.runs(first, n):
            if state == BACKING:
                from_backing.append((start, count))
            elif state in IN_STORE:
                from_store.extend(range(start, start + count))
            elif state == SAME:
                self._fill(start, count, view, first)
            else:
                c.add(PagerCounter.ZERO_READS, count)
        failed = 0
        for at in range(0, len(from_store), MAX_GET_PAGES):
            batch = from_store[at : at + MAX_GET_PAGES]
            bad, fallback = await self._read_from_store(batch, view, first)
            failed += bad
            from_backing.extend((page, 1) for page in fallback)
        for start, count in from_backing:
            failed += await self._read_from_backing(start, count, view, first)
        if failed:
            c.add(PagerCounter.READ_FAILURES, failed)
            raise PageUnavailable(f"{failed} page(s) in {first}..{first + n - 1} could not be read")
        return bytes(out)

    def _fill(self, start: int, count: int, view: memoryview, first: int) -> None:
        """Rebuild a run of same-filled pages from their fill words (zero fills are
        already there: the read buffer starts zeroed)."""
        sums = self.map.sums
        for page in range(start, start + count):
            word = sums[page]
            if word:
                at = (page - first) * PAGE_SIZE
                view[at : at + PAGE_SIZE] = filled_page(word)
        self.counters.add(PagerCounter.SAME_FILLED_READS, count)

    async def _read_from_backing(self, start: int, count: int, view: memoryview, first: int) -> int:
        """Read and check a run from the backing file; how many pages failed."""
        at = (start - first) * PAGE_SIZE
        part = view[at : at + count * PAGE_SIZE]
        try:
            await self.backing.read_into(start * PAGE_SIZE, part)
        except OSError as exc:
            log.error("backing file %s failed a read of %d page(s) at page %d: %s",
                      self.backing.path, count, start, exc)
            return count
        seqs, sums = self.map.seqs, self.map.sums
        bad = 0
        for i in range(count):
            page = start + i
            if checksum(part[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], page, seqs[page]) != sums[page]:
                bad += 1
        if bad:
            self._mismatch(bad, f"the backing file at page {start}")
        self.counters.add(PagerCounter.BACKING_READS, count - bad)
        return bad

    def _read_shared(self, pages: array, view: memoryview, first: int) -> array:
        """Read what we can straight from memory the store shares with us, checked as
        any copy is; returns the pages still to ask the store for."""
        read_shared = self.store.read_shared
        seqs, sums = self.map.seqs, self.map.sums
        rest = array("Q")
        retried = 0
        for page in pages:
            at = (page - first) * PAGE_SIZE
            part = view[at : at + PAGE_SIZE]
            seq = seqs[page]
            if read_shared(page, seq, part):
                if checksum(part, page, seq) == sums[page]:
                    continue
                retried += 1  # changed under the copy, or damaged: the store's answer decides
            rest.append(page)
        hits = len(pages) - len(rest)
        if hits:
            self.counters.add(PagerCounter.SHARED_READS, hits)
            self.counters.add(PagerCounter.HOST_READS, hits)
        if retried:
            self.counters.add(PagerCounter.SHARED_RETRIES, retried)
        return rest

    async def _read_from_store(self, pages: array, view: memoryview, first: int) -> tuple[int, list[int]]:
        """Fetch pages from the store into ``view`` and check each one: from shared
        memory where the store shares it, by asking otherwise.  Returns (pages that
        failed, write-through pages to read from the backing file instead)."""
        pages = self._read_shared(pages, view, first)
        if not pages:
            return 0, []
        states, seqs, sums = self.map.states, self.map.seqs, self.map.sums
        # The states as they are now: the store's notice that our pages are gone
        # may change the map while we wait, but not what this read must do.
        before = bytes(states[page] for page in pages)
        answer = await self._get(pages, wait=HOST in before)
        fallback: list[int] = []
        failed = mismatched = 0
        for i, page in enumerate(pages):
            cached = before[i] == HOST_WT
            if answer is None:
                if cached:
                    fallback.append(page)
                else:
                    failed += 1
                continue
            if answer.statuses[i] != _STORED:
                if cached:
                    if states[page] == HOST_WT:
                        states[page] = BACKING  # the store dropped its cached copy
                    fallback.append(page)
                else:
                    if states[page] == HOST:
                        self._lose(page)
                    failed += 1
                continue
            data = answer.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            if answer.seqs[i] != seqs[page] or checksum(data, page, seqs[page]) != sums[page]:
                mismatched += 1
                if cached:
                    fallback.append(page)
                else:
                    failed += 1
                continue
            at = (page - first) * PAGE_SIZE
            view[at : at + PAGE_SIZE] = data
        if mismatched:
            self._mismatch(mismatched, "the store")
        self.counters.add(PagerCounter.HOST_READS, len(pages) - len(fallback) - failed)
        self.counters.add(PagerCounter.WRITETHROUGH_BACKING_READS, len(fallback))
        return failed, fallback

    async def _get(self, pages: array, wait: bool) -> Any:
        """The store's answer, or None.  A read of pages only the store has waits up
        to ``read_timeout`` for it (it has nowhere else to go, and failing it kills
        whoever swapped the page out); a read of cached pages does not wait."""
        with trio.move_on_after(self.read_timeout if wait else self.write_timeout):
            while True:
                if not self.store.connected:
                    if not wait:
                        return None
                    await self.store.wait_connected()
                try:
                    return await self.store.get(pages)
                except StoreUnavailable:
                    if not wait:
                        return None
                    await trio.sleep(0.01)
                except StoreError as exc:
                    log.error("store failed a get of %d pages: %s", len(pages), exc)
                    return None
        log.error("no answer from the store in %.1fs for %d page(s)",
                  self.read_timeout if wait else self.write_timeout, len(pages))
        return None

    def _mismatch(self, pages: int, where: str) -> None:
        self.counters.add(PagerCounter.CHECKSUM_ERRORS, pages)
        self._bad_pages.error("%d page(s) from %s failed their checksum or version check: refused (EIO)",
                              pages, where)

    def _lose(self, page: int) -> None:
        self.map.states[page] = LOST
        self.counters.add(PagerCounter.PAGES_LOST)
        self._lost_reads.error("the store does not hold page %d, which it accepted: marked lost", page)

    # -- the store's notices ------------------------------------------------------

    def pages_lost(self) -> None:
        """The store no longer holds our pages: those only it had are lost, cached ones
        are read from the backing file from now on.  A new store is offered pages at
        once: the pressure an old one reported was its own."""
        self._held_off_until = -math.inf
        self.map.replace_state(HOST_WT, BACKING)
        lost = self.map.replace_state(HOST, LOST)
        if lost:
            self.counters.add(PagerCounter.PAGES_LOST, lost)
            log.error("%d page(s) were only in the host store, which no longer has them: reads of them "
                      "fail (EIO) until they are rewritten", lost)

    async def take_back(self, handback: HandBack) -> bytes:
        """The store hands pages back: check each against the map, write the ones we
        still need to the backing file, and move the map to it.  One TakeStatus per page."""
        n = len(handback.pages)
        out = bytearray(n)  # TAKEN
        self.counters.add(PagerCounter.HANDBACK_REQUESTS)
        order = sorted(range(n), key=handback.pages.__getitem__)
        runs: list[list[int]] = []
        for i in order:
            page = handback.pages[i]
            if page >= self.npages:
                out[i] = TakeStatus.NOT_NEEDED
            elif runs and handback.pages[runs[-1][-1]] + 1 == page:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first = handback.pages[run[0]]
            async with self.locks.exclusive(first, len(run)):
                await self._take_run(handback, run, out)
        c = self.counters
        c.add(PagerCounter.HANDBACK_TAKEN, out.count(TakeStatus.TAKEN))
        c.add(PagerCounter.HANDBACK_NOT_NEEDED, out.count(TakeStatus.NOT_NEEDED))
        c.add(PagerCounter.HANDBACK_FAILED, out.count(TakeStatus.FAILED))
        return bytes(out)

    async def _take_run(self, handback: HandBack, run: list[int], out: bytearray) -> None:
        states, seqs, sums = self.map.states, self.map.seqs, self.map.sums
        data = memoryview(handback.data)
        to_write: list[int] = []
        for i in run:
            page, seq = handback.pages[i], handback.seqs[i]
            state = states[page]
            if state not in IN_STORE or seqs[page] != seq:
                out[i] = TakeStatus.NOT_NEEDED
                continue
            if checksum(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], page, seq) != sums[page]:
                self._mismatch(1, "a hand-back")
                out[i] = TakeStatus.NOT_NEEDED  # the store's copy is bad: we do not want it
                if state == HOST_WT:
                    states[page] = BACKING
                else:
                    self._lose(page)
                continue
            if state == HOST_WT:
                states[page] = BACKING  # the backing file has it already
                continue
            to_write.append(i)
        if not to_write:
            return
        parts = [(handback.pages[i] * PAGE_SIZE, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in to_write]
        try:
            await self.backing.write_many(parts)
        except OSError as exc:
            self._backing_failed(handback.pages[to_write[0]], len(to_write), exc)
            for i in to_write:
                out[i] = TakeStatus.FAILED
            return
        for i in to_write:
            states[handback.pages[i]] = BACKING
        self.counters.add(PagerCounter.BACKING_WRITES, len(to_write))

    # -- discard ----------------------------------------------------------------

    async def discard(self, offset: int, length: int) -> None:
        """Forget the whole pages in [offset, offset + length) (a freed swap slot).

        They leave the page map and read as zeros again; the store drops the
        ones it holds, in one request.  Their backing blocks stay: punching
        them out would make the next write there allocate blocks, a journal
        transaction on the swap-out path (docs/pressure.md).  Partial pages at
        the edges are left alone, as is anything past the end.
        """
        first, n = covered_pages(offset, length, self.npages)
        c = self.counters
        c.add(PagerCounter.DISCARD_REQUESTS)
        if not n:
            return
        async with self.locks.exclusive(first, n):
            runs = list(self.map.runs(first, n))
            self.map.set_range(first, n, UNWRITTEN)
            c.add(PagerCounter.DISCARD_PAGES, sum(count for state, _, count in runs if state != UNWRITTEN))
            if any(state in IN_STORE for state, _, _ in runs):
                await self._drop_from_store(first, n, self._next_seq())

    async def _drop_from_store(self, first: int, n: int, seq: int) -> None:
        """One invalidate for the whole range; if the store cannot take it now,
        the orphan task retries (the sequence number keeps that safe)."""
        dropped = None
        if self.store.connected:
            with trio.move_on_after(self.write_timeout):
                try:
                    dropped = await self.store.invalidate(first, n, seq)
                except (StoreUnavailable, StoreError):
                    pass
        if dropped is None:
            self._queue_orphan(first, n, seq, PagerCounter.DISCARD_HOST_PAGES)
        else:
            self.counters.add(PagerCounter.DISCARD_HOST_PAGES, dropped)

    # -- the rest ---------------------------------------------------------------

    async def release_all(self) -> None:
        """On clean shutdown: tell the store it may drop everything we left there."""
        if self.store.connected and (self.orphans_pending or any(state in self.map.states for state in IN_STORE)):
            with trio.move_on_after(self.write_timeout):
                try:
                    await self.store.invalidate(0, self.npages, self._next_seq())
                except (StoreUnavailable, StoreError) as exc:
                    log.warning("could not release pages in the store: %s", exc)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"device_bytes": self.size, "device_pages": self.npages,
                                 "writethrough": self.writethrough}
        stats.update({f"pages_{k}": v for k, v in self.map.counts().items()})
        stats["host_connected"] = self.store.connected
        stats["orphans_pending"] = self.orphans_pending
        stats.update(self.counters.as_dict())
        return stats
