"""Readers share a range of pages; a writer has it alone.

Writes, discards and hand-backs of a page are applied one at a time and in
order, and a read never sees a page halfway through one of them: its map
entry, store copy and backing copy always agree.  The kernel never issues
conflicting I/O on one swap slot, so waits are rare; holders are few (one per
FUSE request in flight), so a list scan does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio


class RangeLock:
    def __init__(self) -> None:
        self._holders: list[tuple[int, int, bool]] = []
        self._lot = trio.lowlevel.ParkingLot()

    def _conflicts(self, first: int, end: int, exclusive: bool) -> bool:
        return any(
            first < h_end and h_first < end and (exclusive or h_excl)
            for h_first, h_end, h_excl in self._holders
        )

    async def _acquire(self, first: int, count: int, exclusive: bool) -> tuple[int, int, bool]:
        end = first + count
        while self._conflicts(first, end, exclusive):
            await self._lot.park()
        holder = (first, end, exclusive)
        self._holders.append(holder)
        return holder

    def _release(self, holder: tuple[int, int, bool]) -> None:
        self._holders.remove(holder)
        self._lot.unpark_all()

    @asynccontextmanager
    async def _hold(self, first: int, count: int, exclusive: bool) -> AsyncIterator[None]:
        holder = await self._acquire(first, count, exclusive)
        try:
            yield
        finally:
            self._release(holder)

    def shared(self, first: int, count: int) -> AbstractAsyncContextManager[None]:
        return self._hold(first, count, False)

    def exclusive(self, first: int, count: int) -> AbstractAsyncContextManager[None]:
        return self._hold(first, count, True)

    def free(self, first: int, count: int) -> bool:
        """No writer holds any of these pages now (a reader could take them at once)."""
        return not self._conflicts(first, first + count, False)

    @property
    def held(self) -> int:
        return len(self._holders)

    def waiting(self) -> int:
        """Tasks waiting for a range (tests wait for a task to reach its lock)."""
        return self._lot.statistics().tasks_waiting
