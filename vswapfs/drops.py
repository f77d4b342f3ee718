"""Pages the store should no longer hold: the orphan queue, discards and the release at shutdown.

A batch whose put timed out may land in the store later; a discarded page or
one that became same-filled leaves a stale copy there.  Each becomes a drop
request (first page, count, sequence number) that the orphan task sends when
the store can take it; the store drops only versions not newer than the
request's, so a drop can never reach a page the map points at.
"""

from __future__ import annotations

import logging
import math

import trio

from pagewire.messages import PAGE_SIZE

from .pagemap import IN_STORE, UNWRITTEN
from .pagercore import Part, PagerCore
from .pagercounters import PagerCounter
from .pagestore import StoreError, StoreUnavailable

log = logging.getLogger("vswapfs.pager")

# A drop request for the orphan task: first page, count, sequence number, and the
# counter that adds the pages dropped (None: a timed-out batch, counted per request).
_Orphan = tuple[int, int, int, PagerCounter | None]


def covered_pages(offset: int, length: int, npages: int) -> tuple[int, int]:
    """(first page, count) of the whole pages inside [offset, offset + length),
    clipped to the device; partial pages at either edge are not covered."""
    if offset < 0 or length <= 0:
        return 0, 0
    first = -(-offset // PAGE_SIZE)
    end = min((offset + length) // PAGE_SIZE, npages)
    return (first, end - first) if end > first else (0, 0)


class Drops(Part):
    def __init__(self, core: PagerCore) -> None:
        super().__init__(core)
        self._orphans_send, self._orphans_recv = trio.open_memory_channel[_Orphan](math.inf)
        self.pending = 0  # drop requests the store has yet to receive

    def queue(self, first: int, n: int, seq: int, dropped_counter: PagerCounter | None) -> None:
        """Ask the store (via the orphan task) to drop versions up to ``seq`` of pages
        ``first ..``; ``dropped_counter`` adds the pages it dropped (None: a timed-out
        batch, counted once per request in ORPHAN_INVALIDATIONS)."""
        self.pending += 1
        self._orphans_send.send_nowait((first, n, seq, dropped_counter))

    async def run(self) -> None:
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
            self.pending -= 1

    async def discard(self, offset: int, length: int) -> None:
        """Forget the whole pages in [offset, offset + length) (a freed swap slot).

        They leave the page map and read as zeros again; the store drops the
        ones it holds, in one request.  Their backing blocks stay: punching
        them out would make the next write there allocate blocks, a journal
        transaction on the swap-out path (docs/pressure.md).  Partial pages at
        the edges are left alone, as is anything past the end.
        """
        first, n = covered_pages(offset, length, self.core.npages)
        c = self.counters
        c.add(PagerCounter.DISCARD_REQUESTS)
        if not n:
            return
        async with self.locks.exclusive(first, n):
            runs = list(self.map.runs(first, n))
            self.map.set_range(first, n, UNWRITTEN)
            c.add(PagerCounter.DISCARD_PAGES, sum(count for state, _, count in runs if state != UNWRITTEN))
            if any(state in IN_STORE for state, _, _ in runs):
                await self._drop_from_store(first, n, self.core.next_seq())

    async def _drop_from_store(self, first: int, n: int, seq: int) -> None:
        """One invalidate for the whole range; if the store cannot take it now,
        the orphan task retries (the sequence number keeps that safe)."""
        dropped = None
        if self.store.connected:
            with trio.move_on_after(self.core.write_timeout):
                try:
                    dropped = await self.store.invalidate(first, n, seq)
                except (StoreUnavailable, StoreError):
                    pass
        if dropped is None:
            self.queue(first, n, seq, PagerCounter.DISCARD_HOST_PAGES)
        else:
            self.counters.add(PagerCounter.DISCARD_HOST_PAGES, dropped)

    async def release_all(self) -> None:
        """On clean shutdown: tell the store it may drop everything we left there."""
        if self.store.connected and (self.pending or any(state in self.map.states for state in IN_STORE)):
            with trio.move_on_after(self.core.write_timeout):
                try:
                    await self.store.invalidate(0, self.core.npages, self.core.next_seq())
                except (StoreUnavailable, StoreError) as exc:
                    log.warning("could not release pages in the store: %s", exc)
