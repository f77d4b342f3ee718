"""An in-process store for pager tests: the real hoststore Store behind the
pager's async interface, with knobs to refuse, stall and disconnect."""

from __future__ import annotations

import trio

from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.protocol import PAGE_SIZE, PageStatus
from hoststore.store import Store
from vswapfs.hostclient import StoreUnavailable


class FakeStore:
    def __init__(self, npages: int, capacity: int | None = None) -> None:
        self.pressure = 10.0
        self.store = Store(
            Limits(capacity_pages=capacity if capacity is not None else npages),
            Sampler(0, source=lambda: Snapshot.fake(self.pressure)),
        )
        self.client = self.store.attach("fake", npages * PAGE_SIZE, "session")
        self.up = True
        self.delay = 0.0  # seconds each call takes (a slow store)
        self.refuse_every = 0  # refuse every Nth page offered, by pressure
        self.offered = 0
        self.drop_connection_in_call = False
        self._connected = trio.Event()
        self._connected.set()

    # knobs
    def disconnect(self) -> None:
        self.up = False
        self._connected = trio.Event()

    def reconnect(self) -> None:
        self.up = True
        self._connected.set()

    # the PageStore interface
    @property
    def connected(self) -> bool:
        return self.up

    async def wait_connected(self) -> None:
        while not self.up:
            await self._connected.wait()

    async def _enter(self) -> None:
        if not self.up:
            raise StoreUnavailable("down")
        if self.delay:
            await trio.sleep(self.delay)
        if self.drop_connection_in_call:
            self.drop_connection_in_call = False
            self.disconnect()
            raise StoreUnavailable("connection lost")

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        await self._enter()
        out = bytearray(self.store.put(self.client, first, seq, bytes(data)))
        if self.refuse_every:
            for i in range(len(out)):
                self.offered += 1
                if self.offered % self.refuse_every == 0 and out[i] == PageStatus.STORED:
                    # Refuse as the store would: drop what it just stored.
                    self.store.invalidate(self.client, first + i, 1, seq)
                    out[i] = PageStatus.REFUSED_PRESSURE
        return bytes(out)

    async def get(self, pages: list[int]) -> tuple[bytes, bytes]:
        await self._enter()
        return self.store.get(self.client, pages)

    async def invalidate(self, first: int, count: int, seq: int) -> int:
        await self._enter()
        return self.store.invalidate(self.client, first, count, seq)
