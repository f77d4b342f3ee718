"""Reads: each page from where the map says it lives, checked before it is returned.

A page's version and checksum must match the map's whatever it comes from (the
store's answer, memory the store shares with us, the backing file); a page that
cannot be produced fails the read (EIO), never zeros and never another version.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

import trio

from pagewire.messages import MAX_GET_PAGES, PAGE_SIZE, PageStatus

from .integrity import checksum
from .pagemap import BACKING, HOST, HOST_WT, IN_STORE, LOST, SAME, filled_page
from .pagercore import InvalidIO, PageUnavailable, Part
from .pagercounters import PagerCounter
from .pagestore import StoreError, StoreUnavailable

log = logging.getLogger("vswapfs.pager")

_STORED = PageStatus.STORED


class Reader(Part):
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
            self.core.lost_reads.error("read of %d lost page(s) at page %d failed at once", lost, first)
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
            self.core.mismatch(bad, f"the backing file at page {start}")
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
                        self.core.lose(page)
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
            self.core.mismatch(mismatched, "the store")
        self.counters.add(PagerCounter.HOST_READS, len(pages) - len(fallback) - failed)
        self.counters.add(PagerCounter.WRITETHROUGH_BACKING_READS, len(fallback))
        return failed, fallback

    async def _get(self, pages: array, wait: bool) -> Any:
        """The store's answer, or None.  A read of pages only the store has waits up
        to ``read_timeout`` for it (it has nowhere else to go, and failing it kills
        whoever swapped the page out); a read of cached pages does not wait."""
        with trio.move_on_after(self.core.read_timeout if wait else self.core.write_timeout):
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
                  self.core.read_timeout if wait else self.core.write_timeout, len(pages))
        return None
