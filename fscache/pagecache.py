"""The cache's pager: file pages offered to a store's ephemeral pool, read back checked, never stale.

Testable without FUSE: the filesystem (``fscache.fs``) calls :meth:`PageCache.opened`
at each open, :meth:`PageCache.read` for reads and :meth:`PageCache.changing` around
every change it makes to a LOWER file; LOWER itself comes in as a function reading
pages.  The rules:

* **What the store holds is never trusted.**  A page is served from the store only
  if the slot still belongs to that file page, and the copy's version and checksum
  (over the slot, the version and the data) match what was recorded when it was
  offered.  Anything else (dropped, refused, damaged, an older owner's copy, a store
  that restarted) is a miss, read from LOWER.
* **Never stale.**  Every change through the mount forgets the pages it touches
  before it reaches LOWER, and moves the file's version on both before and after;
  an offer made from data read while the version moved is not kept.  A file whose
  identity (``fscache.lowerfile``) differs at open is forgotten whole.
* **Never a second copy.**  The map of what is cached lives here; the store only
  holds copies, which it may drop whenever it likes (an ephemeral pool).
* **The store never fails a read.**  A store that is away, slow or answers an error
  costs a read from LOWER, nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from pagewire.messages import MAX_GET_PAGES, MAX_PUT_PAGES, PAGE_SIZE, HandBack, PageStatus, TakeStatus
from vswapcommon.counters import Counters
from vswapfs.integrity import checksum
from vswapfs.pagestore import PageStore, StoreError, StoreUnavailable

from .counters import CacheCounter
from .lowerfile import Identity
from .slots import FREE, Slots

log = logging.getLogger("fscache.pagecache")

ReadLower = Callable[[int, int], Awaitable[bytes]]  # (first page, count) -> data, short at the end
_STORED = PageStatus.STORED
SHUN_TIMEOUTS = 5  # after a store timeout, leave the store alone for this many timeouts
DOUBT = -1  # the size of a file whose identity the cache cannot vouch for: it matches no file


class Change:
    """A change through the mount in progress: the file as it was just before (once checked),
    and the size the change says LOWER has after it, if it alone changed the file (set by
    whoever makes the change; None: not said, and not checked)."""

    __slots__ = ("before", "size")

    def __init__(self, before: Identity) -> None:
        self.before = before
        self.size: int | None = None


class CachedFile:
    """One LOWER file as the cache knows it: its identity, and which of its pages are in which slot."""

    __slots__ = ("number", "ident", "pages", "version", "opens", "changes", "started")

    def __init__(self, number: int, ident: Identity) -> None:
        self.number = number  # never reused: slots name their owner by it
        self.ident = ident
        self.pages: dict[int, int] = {}  # page index -> slot
        self.version = 0  # moves on with every change through the mount
        self.opens = 0  # handles open on it through the mount
        self.changes = 0  # changes through the mount in progress
        self.started = 0  # changes through the mount begun, ever


class PageCache:
    def __init__(self, store: PageStore, slots: int, *, store_timeout: float = 1.0,
                 counters: Counters[CacheCounter] | None = None) -> None:
        self.store = store
        self.slots = Slots(slots)
        self.store_timeout = store_timeout
        self.counters = counters or Counters(CacheCounter)
        self.files: dict[tuple[int, int], CachedFile] = {}
        self._by_number: dict[int, CachedFile] = {}
        self._next_number = 1
        self._seq = 0
        self._shunned_until = float("-inf")
        store.set_handlers(self._on_handback, self._on_pages_lost)

    def _usable(self) -> bool:
        """Whether to ask the store at all: not while it is away, nor for a while after it
        was too slow to answer (each ask would cost a read the whole timeout again)."""
        return self.store.connected and trio.current_time() >= self._shunned_until

    def _too_slow(self) -> None:
        self._shunned_until = trio.current_time() + SHUN_TIMEOUTS * self.store_timeout
        log.warning("the store did not answer within %gs: reads go to LOWER alone for %gs", self.store_timeout,
                    SHUN_TIMEOUTS * self.store_timeout)

    # -- files ------------------------------------------------------------------------

    def opened(self, ident: Identity) -> tuple[CachedFile, bool]:
        """The file now open (one record per file, shared by every handle on it), and
        whether it is the same as when the cache last saw it (so the kernel's own cached
        pages of it are still good).  A file that changed behind the mount's back has
        its pages forgotten first.  Each call is matched by one :meth:`closed`."""
        f = self.files.get(ident.key)
        same = f is not None and f.ident == ident
        if f is None:
            f = CachedFile(self._next_number, ident)
            self._next_number += 1
            self.files[ident.key] = f
            self._by_number[f.number] = f
        f.opens += 1  # first: an open file keeps its record through the reset
        if not same and f.ident != ident:
            if not f.changes and f.ident.size != DOUBT:  # else it may be the mount's own doing
                self.counters.add(CacheCounter.LOWER_CHANGES)
            self._reset(f)
            f.ident = ident
        return f, same

    def closed(self, f: CachedFile) -> None:
        f.opens -= 1
        self._maybe_unused(f)

    def known(self, f: CachedFile) -> bool:
        """Whether ``f`` is still the cache's record of its file (not gone)."""
        return self._by_number.get(f.number) is f

    def _reset(self, f: CachedFile) -> None:
        """Forget every page of ``f`` (its version moves on, for any offer in flight)."""
        self._drop_pages(f, list(f.pages), CacheCounter.INVALIDATED_PAGES)
        f.version += 1

    def gone(self, key: tuple[int, int]) -> None:
        """The file at ``key`` has no name left: forget it.  Handles still open on it read
        and write LOWER, and nothing of it is cached any more."""
        f = self.files.pop(key, None)
        if f is not None:
            self._by_number.pop(f.number, None)
            self._reset(f)

    def _maybe_unused(self, f: CachedFile) -> None:
        """A file neither open nor with a page cached is not worth a record."""
        if not f.opens and not f.pages and not f.changes and self.known(f):
            del self._by_number[f.number]
            if self.files.get(f.ident.key) is f:
                del self.files[f.ident.key]

    @asynccontextmanager
    async def changing(self, f: CachedFile, first: int, count: int | None, now: Callable[[], Identity],
                       before: Identity | None = None) -> AsyncIterator[Change]:
        """Around a change to pages ``first .. first + count`` of ``f`` (all of them from
        ``first`` on when ``count`` is None), made through the mount.

        Before it: if the file is not as the cache last saw it (``now()``, its identity),
        it changed behind the mount's back and all of it is forgotten; else the pages the
        change touches are.  While it is in progress nothing read from LOWER is kept, and
        the version moves on before and after it, so no offer of data read meanwhile is
        kept either.  After it, the file's identity is recorded as the cache's own doing
        only if the change explains it: the change alone was in progress, and LOWER's size
        is what the change says it made it (:class:`Change`); otherwise all of the file is
        forgotten.  ``now`` is a blocking call (one fstat, run in a worker thread);
        ``before``, the identity just before the change where the caller has it."""
        f.version += 1
        alone = not f.changes
        if not alone:
            before = f.ident
        f.changes += 1
        f.started += 1
        started = f.started
        change = Change(f.ident)
        try:
            if before is None:
                before = await _identity(now)
            if before != f.ident:
                if f.ident.size != DOUBT:
                    self.counters.add(CacheCounter.LOWER_CHANGES)
                self._reset(f)
                if before is not None:
                    f.ident = change.before = before
            else:
                end = None if count is None else first + count
                self._drop_pages(f, [i for i in f.pages if i >= first and (end is None or i < end)],
                                 CacheCounter.INVALIDATED_PAGES)
            yield change
        finally:
            f.version += 1
            with trio.CancelScope(shield=True):
                ident = await _identity(now)
            f.changes -= 1
            self._changed(f, change, ident, alone and f.started == started)

    def _changed(self, f: CachedFile, change: Change, ident: Identity | None, alone: bool) -> None:
        """After a change through the mount: the file's identity, if the change explains it.
        If not, nothing of the file is kept, and its identity is left in doubt (matching no
        file), so that its next open also tells the kernel to drop what it holds of it."""
        if ident is not None and ident.key == f.ident.key and alone and change.size in (None, ident.size):
            f.ident = ident
            return
        if ident is not None and alone and change.size is not None and ident.size != change.size:
            self.counters.add(CacheCounter.LOWER_CHANGES)  # LOWER changed meanwhile, behind the mount's back
        self._reset(f)
        f.ident = dataclasses.replace(f.ident, size=DOUBT)
        self._maybe_unused(f)

    # -- reads ------------------------------------------------------------------------

    async def read(self, f: CachedFile, read_lower: ReadLower, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (short at the end of the file)."""
        if size <= 0:
            return b""
        self.counters.add(CacheCounter.READ_REQUESTS)
        first = offset // PAGE_SIZE
        n = -(-(offset + size) // PAGE_SIZE) - first
        out = bytearray(n * PAGE_SIZE)
        view = memoryview(out)
        served = await self._from_store(f, first, n, view)
        end = offset + size  # store copies are of whole pages: only a short read of LOWER ends the file
        for start, count in _gaps(served, first, n):
            data = await self._from_lower(f, read_lower, start, count)
            at = (start - first) * PAGE_SIZE
            view[at : at + len(data)] = data
            if len(data) < count * PAGE_SIZE:
                end = min(end, start * PAGE_SIZE + len(data))
                break
        base = first * PAGE_SIZE
        return bytes(view[offset - base : max(end, offset) - base])

    async def _from_store(self, f: CachedFile, first: int, n: int, view: memoryview) -> list[bool]:
        """Fill what the store holds of pages ``first .. first + n``; which pages it served."""
        served = [False] * n
        wanted: list[tuple[int, int, int, int]] = []  # (page index, slot, seq, checksum)
        slots = self.slots
        for i in range(first, first + n):
            slot = f.pages.get(i)
            if slot is not None:
                wanted.append((i, slot, slots.seq[slot], slots.sum[slot]))
        if not wanted or not self._usable():
            self.counters.add(CacheCounter.HOST_MISSES, self._whole_pages(f, first, n))
            return served
        ask = []
        for i, slot, seq, csum in wanted:
            at = (i - first) * PAGE_SIZE
            part = view[at : at + PAGE_SIZE]
            if self.store.read_shared(slot, seq, part) and checksum(part, slot, seq) == csum:
                served[i - first] = True
                self.counters.add(CacheCounter.SHARED_HITS)
            else:
                ask.append((i, slot, seq, csum))
        for at in range(0, len(ask), MAX_GET_PAGES):
            if not self._usable():
                break  # one timeout per read at most: the rest from LOWER
            await self._get(f, ask[at : at + MAX_GET_PAGES], first, view, served)
        hits = sum(served)
        self.counters.add(CacheCounter.HOST_HITS, hits)
        self.counters.add(CacheCounter.HOST_MISSES, max(0, self._whole_pages(f, first, n) - hits))
        return served

    def _whole_pages(self, f: CachedFile, first: int, n: int) -> int:
        """How many of pages ``first .. first + n`` are whole pages of the file (the only
        ones the cache keeps, so the only ones a miss is counted for)."""
        return max(0, min(first + n, f.ident.size // PAGE_SIZE) - first)

    async def _get(self, f: CachedFile, batch: list[tuple[int, int, int, int]], first: int,
                   view: memoryview, served: list[bool]) -> None:
        answer = None
        with trio.move_on_after(self.store_timeout) as scope:
            try:
                answer = await self.store.get(array("Q", [slot for _, slot, _, _ in batch]))
            except (StoreUnavailable, StoreError) as exc:
                log.debug("store get failed (reading LOWER instead): %s", exc)
        if scope.cancelled_caught:
            self._too_slow()
        if answer is None:
            return
        data = memoryview(answer.data)
        for k, (i, slot, seq, csum) in enumerate(batch):
            part = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            if answer.statuses[k] == _STORED and answer.seqs[k] == seq and checksum(part, slot, seq) == csum:
                at = (i - first) * PAGE_SIZE
                view[at : at + PAGE_SIZE] = part
                served[i - first] = True
                continue
            if answer.statuses[k] == _STORED:
                self.counters.add(CacheCounter.STALE_COPIES)
            if f.pages.get(i) == slot and self.slots.seq[slot] == seq:  # dropped or damaged: the slot is free
                del f.pages[i]
                self.slots.free(slot)
        self._maybe_unused(f)

    async def _from_lower(self, f: CachedFile, read_lower: ReadLower, start: int, count: int) -> bytes:
        """Pages from LOWER, and an offer of the whole ones to the store, unless the file is
        being changed through the mount now (what LOWER holds is then in flux) or is gone."""
        version, steady = f.version, not f.changes and self.known(f)
        data = await read_lower(start, count)
        whole = len(data) // PAGE_SIZE
        self.counters.add(CacheCounter.LOWER_PAGES_READ, -(-len(data) // PAGE_SIZE))
        if whole and steady and f.version == version:
            await self._offer(f, version, start, memoryview(data)[: whole * PAGE_SIZE])
        return data

    # -- offers -----------------------------------------------------------------------

    async def _offer(self, f: CachedFile, version: int, start: int, data: memoryview) -> None:
        """Offer whole pages read from LOWER at ``version`` of ``f``; keep those the store took,
        if the file is still at that version and still the cache's."""
        n = len(data) // PAGE_SIZE
        done = 0
        for first, count in self._take_slots(n) if self._usable() else ():
            for at in range(0, count, MAX_PUT_PAGES):
                if not self._usable():  # one timeout per read at most
                    self.counters.add(CacheCounter.OFFER_FAILED, n - done - at)
                    return
                k = min(MAX_PUT_PAGES, count - at)
                part = data[(done + at) * PAGE_SIZE : (done + at + k) * PAGE_SIZE]
                await self._put(f, version, start + done + at, first + at, part)
            done += count
        self.counters.add(CacheCounter.OFFER_FAILED, n - done)

    def _take_slots(self, n: int) -> Iterator[tuple[int, int]]:
        """Runs of slots for ``n`` pages, their old pages forgotten (oldest first)."""
        slots = self.slots
        for first, count in slots.take(n):
            for slot in range(first, first + count):
                owner = slots.owner[slot]
                if owner != FREE:
                    old = self._by_number.get(owner)
                    index = slots.index[slot]
                    if old is not None and old.pages.get(index) == slot:
                        del old.pages[index]
                        self.counters.add(CacheCounter.EVICTED_PAGES)
                        self._maybe_unused(old)
                    slots.free(slot)
            yield first, count

    async def _put(self, f: CachedFile, version: int, index: int, slot: int, part: memoryview) -> None:
        k = len(part) // PAGE_SIZE
        self._seq += 1
        seq = self._seq
        sums = [checksum(part[j * PAGE_SIZE : (j + 1) * PAGE_SIZE], slot + j, seq) for j in range(k)]
        self.counters.add(CacheCounter.HOST_OFFERED, k)
        statuses = None
        with trio.move_on_after(self.store_timeout) as scope:
            try:
                statuses = await self.store.put(slot, seq, part)
            except (StoreUnavailable, StoreError) as exc:
                log.debug("store put failed (the pages are simply not cached): %s", exc)
        if scope.cancelled_caught:
            self._too_slow()
        if statuses is None or len(statuses) != k:
            self.counters.add(CacheCounter.OFFER_FAILED, k)
            return
        kept = f.version == version and not f.changes and self.known(f)
        for j in range(k):
            if statuses[j] != _STORED:
                self.counters.add(CacheCounter.HOST_REFUSED)
                continue
            self.counters.add(CacheCounter.HOST_STORED)
            if not kept or self.slots.owner[slot + j] != FREE:
                self.counters.add(CacheCounter.OFFER_RACED)
                continue
            old = f.pages.get(index + j)
            if old is not None and old != slot + j:  # another read offered the same page meanwhile
                self.slots.free(old)
            f.pages[index + j] = slot + j
            self.slots.assign(slot + j, f.number, index + j, seq, sums[j])

    # -- forgetting ----------------------------------------------------------------------

    def _drop_pages(self, f: CachedFile, indexes: list[int], counter: CacheCounter | None) -> None:
        """Forget these pages of ``f`` (their slots become free; the store's copies, if it
        still has them, can no longer be read and are overwritten when the slot is reused)."""
        for i in indexes:
            slot = f.pages.pop(i, None)
            if slot is not None:
                self.slots.free(slot)
                if counter is not None:
                    self.counters.add(counter)
        self._maybe_unused(f)

    async def release_store_copies(self) -> None:
        """Ask the store to drop every copy of ours now (at unmount: they are of no use to anyone)."""
        with trio.move_on_after(self.store_timeout):
            try:
                await self.store.invalidate(0, self.slots.count, max(self._seq, 1))
            except (StoreUnavailable, StoreError):
                pass

    async def _on_handback(self, handback: HandBack) -> bytes:
        """An ephemeral pool's pages are dropped, never handed back; a store asking anyway
        is told it may free them (LOWER holds every one of them)."""
        return bytes([TakeStatus.NOT_NEEDED]) * len(handback.pages)

    def _on_pages_lost(self) -> None:
        """The store restarted without our pages: every slot is free again."""
        self.counters.add(CacheCounter.STORE_LOST)
        for f in list(self._by_number.values()):
            for slot in f.pages.values():
                self.slots.free(slot)
            f.pages.clear()
            self._maybe_unused(f)

    # -- figures ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.counters.as_dict()
        stats["slots"] = self.slots.count
        stats["cached_pages"] = self.slots.used
        stats["files_known"] = len(self.files)
        return stats


async def _identity(now: Callable[[], Identity]) -> Identity | None:
    """``now()`` in a worker thread (a slow LOWER holds up this change, not the daemon);
    None if the file cannot be looked at."""
    try:
        return await trio.to_thread.run_sync(now)
    except OSError:
        return None


def _gaps(served: list[bool], first: int, n: int) -> Iterator[tuple[int, int]]:
    """Runs ``(page, count)`` of the pages not served."""
    i = 0
    while i < n:
        if served[i]:
            i += 1
            continue
        j = i
        while j < n and not served[j]:
            j += 1
        yield first + i, j - i
        i = j
