"""A store for pager tests: the real hoststore ``Store`` behind the PageStore
contract, with a wire the test controls.

Requests travel a FIFO "wire" served by one task, in order, after
``latency`` seconds (or not at all while ``stalled``), as a real connection
does.  A caller who gives up (a timeout) leaves its request on the wire: the
store still applies it later, exactly as a real store would apply a put that
arrived after the client stopped waiting.  Knobs: refuse, stall, disconnect
(choosing how many requests on the wire were served), kill (a new store
instance: its pages are gone), hand pages back, and lie (wrong bytes or wrong
versions in ``get`` answers).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from pagewire import auth
from pagewire.access import IN_PROCESS
from pagewire.causes import DropCause
from pagewire.messages import (PAGE_SIZE, POOL_SWAP, PROTOCOL_VERSION, ROLE_PAGER, Get, GetAnswer, HandBackCause, Hello,
                               PageStatus, Put)
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.store import Store, get_answer
from vswapfs.pagestore import HandBackHandler, PagesLostHandler, StoreError, StoreUnavailable


def _at_once(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a request of the in-memory store, which never waits, to its end now: the
    fake wire serves a request atomically (and ``disconnect`` serves some on the spot)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the in-memory store waited in the middle of a request")


class _Call:
    __slots__ = ("apply", "done", "result", "error", "abandoned")

    def __init__(self, apply: Callable[[], Any]) -> None:
        self.apply = apply
        self.done = trio.Event()
        self.result: Any = None
        self.error: Exception | None = None


class FakeStore:
    def __init__(self, npages: int, capacity: int | None = None, *, latency: float = 0.0,
                 pool: str = POOL_SWAP) -> None:
        self.npages = npages
        self.pool = pool
        self.capacity = capacity if capacity is not None else npages
        self.pressure = 10.0
        self.latency = latency
        self.stalled = False
        self.refuse_every = 0  # refuse every Nth page offered, by pressure
        self.offered = 0
        self.lie: str | None = None  # "data" or "seq": the next get answer is wrong that way
        self.die_after_next_answer = False  # the store dies (and a new one is up) right after answering
        self.up = True
        self._epoch = 0
        self._wire: deque[_Call] = deque()
        self._wire_changed = trio.Event()
        self._worker_started = False
        self._connected = trio.Event()
        self._connected.set()
        self._on_handback: HandBackHandler | None = None
        self._on_pages_lost: PagesLostHandler | None = None
        self.instances = 0
        self._new_instance()
        self.known_instance = self.store.instance

    def _new_instance(self) -> None:
        self.store = Store(Limits(capacity_pages=self.capacity),
                           Sampler(0, source=lambda: Snapshot.fake(self.pressure)))
        hello = Hello(PROTOCOL_VERSION, "fake", ROLE_PAGER, self.npages * PAGE_SIZE, "i" * 8, auth.nonce(),
                      pool=self.pool)
        self.client, _, _ = self.store.attach(hello, auth.nonce(), owner=IN_PROCESS)
        self.instances += 1

    # -- knobs ------------------------------------------------------------------------

    def disconnect(self, serve_pending: int = 0) -> None:
        """The connection drops: the first ``serve_pending`` requests on the wire
        were served, the rest were not; callers still waiting hear it is gone."""
        for i, call in enumerate(list(self._wire)):
            if i < serve_pending:
                self._serve(call)
            else:
                call.error = StoreUnavailable("connection lost")
            call.done.set()
        self._wire.clear()
        self.up = False
        if self._connected.is_set():  # a waiter on the current (unset) event must stay woken by reconnect
            self._connected = trio.Event()

    def kill(self) -> None:
        """The store process dies: everything on the wire and in it is gone."""
        self.disconnect(0)
        self._new_instance()

    def reconnect(self) -> None:
        if self.store.instance != self.known_instance:
            self.known_instance = self.store.instance
            self._epoch += 1
            if self._on_pages_lost is not None:
                self._on_pages_lost()
        self.up = True
        self._connected.set()

    def release(self) -> None:
        """Serve everything stalled on the wire."""
        self.stalled = False
        self._wire_changed.set()

    def drop(self, limit: int, cause: DropCause = DropCause.PRESSURE) -> int:
        """An ephemeral pool's store drops up to ``limit`` of its oldest pages, telling no one."""
        from hoststore.ephemeral import drop_oldest

        return drop_oldest(self.store, self.client, limit, cause)

    @property
    def pages_stored(self) -> int:
        return self.store.pages

    async def hand_back(self, limit: int | None = None, cause: HandBackCause = HandBackCause.PRESSURE) -> int:
        """Hand up to ``limit`` of the oldest pages back through the pager; pages freed."""
        assert self._on_handback is not None
        freed = 0
        while self.client.count > self.client.lent_count and (limit is None or freed < limit):
            batch = await self.store.lend(self.client, cause, 64 if limit is None else min(64, limit - freed))
            if batch is None:
                break
            statuses = await self._on_handback(batch)
            got = self.store.settle(self.client, batch, statuses)
            freed += got
            if not got:
                break
        return freed

    # -- the PageStore contract ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.up

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_handlers(self, on_handback: HandBackHandler, on_pages_lost: PagesLostHandler) -> None:
        self._on_handback = on_handback
        self._on_pages_lost = on_pages_lost

    async def wait_connected(self) -> None:
        while not self.up:
            await self._connected.wait()

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        msg = Put(first, seq, bytes(data))
        return await self._call(lambda: self._put(msg))

    async def get(self, pages: array) -> GetAnswer:
        msg = Get(array("Q", pages))
        return await self._call(lambda: self._get(msg))

    async def invalidate(self, first: int, count: int, seq: int) -> int:
        return await self._call(lambda: self.store.invalidate(self.client, first, count, seq))

    def read_shared(self, page: int, seq: int, out: memoryview) -> bool:
        return False  # every page travels on the (fake) wire

    # -- the wire -------------------------------------------------------------------------

    async def _call(self, apply: Callable[[], Any]) -> Any:
        if not self.up:
            raise StoreUnavailable("down")
        if not self._worker_started:
            self._worker_started = True
            trio.lowlevel.spawn_system_task(self._worker)
        call = _Call(apply)
        self._wire.append(call)
        self._wire_changed.set()
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def _worker(self) -> None:
        while True:
            while not self._wire or self.stalled:
                self._wire_changed = trio.Event()
                await self._wire_changed.wait()
            call = self._wire[0]
            if self.latency:
                await trio.sleep(self.latency)
            if not self._wire or self._wire[0] is not call or self.stalled:
                continue  # disconnected or stalled meanwhile
            self._wire.popleft()
            self._serve(call)
            call.done.set()
            if self.die_after_next_answer:
                self.die_after_next_answer = False
                self.kill()
                self.reconnect()

    def _serve(self, call: _Call) -> None:
        try:
            call.result = _at_once(call.apply())
        except Exception as exc:  # noqa: BLE001 - the store's error goes to the caller, as over the wire
            call.error = StoreError(str(exc))

    async def _put(self, msg: Put) -> bytes:
        out = bytearray(await self.store.put(self.client, msg.first, msg.seq, msg.data))
        if self.refuse_every:
            for i in range(len(out)):
                self.offered += 1
                if self.offered % self.refuse_every == 0 and out[i] == PageStatus.STORED:
                    # Refuse as the store would: drop what it just stored.
                    await self.store.invalidate(self.client, msg.first + i, 1, msg.seq)
                    out[i] = PageStatus.REFUSED_PRESSURE
        return bytes(out)

    async def _get(self, msg: Get) -> GetAnswer:
        answer = await get_answer(self.store, self.client, msg.pages)
        lie, self.lie = self.lie, None
        if lie == "data" and answer.statuses[0] == PageStatus.STORED:
            data = bytearray(answer.data)
            data[100] ^= 0x01
            return GetAnswer(answer.statuses, answer.seqs, bytes(data))
        if lie == "seq" and answer.statuses[0] == PageStatus.STORED:
            seqs = array("Q", answer.seqs)
            seqs[0] += 1
            return GetAnswer(answer.statuses, seqs, answer.data)
        return answer
