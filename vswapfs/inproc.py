"""The in-process store: admitted pages kept in vswapfs's own memory.

``vswapfs --host inproc`` runs hoststore's :class:`~hoststore.store.Store`
inside vswapfs, with its one client attached, so the same admission rules
(watermarks with hysteresis, capacity), the same counters and the same
pressure hand-back apply, with no process, socket or message in between.
It is a daemon-less userspace RAM swap for quick experiments, and the floor
every other store is measured against (``vswapctl bench``'s ``inproc``).

What is different from a store daemon, by nature:

* it is always connected, and its pages never outlive the vswapfs holding
  them: there is no reconnect, no epoch change, and nothing to drain;
* a page it hands back under pressure goes straight to the pager's
  :meth:`~vswapfs.pager.Pager.take_back`, then is freed as the answer says.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from array import array
from collections.abc import Callable
from typing import Any

import trio

from pagewire.access import IN_PROCESS
from pagewire.codec import COMPRESS_CHOICES, DEFAULT_COMPRESS, Codec, DecodeError
from pagewire.address import INPROC, Address
from pagewire.messages import (NONCE_SIZE, POOL_SWAP, PROTOCOL_VERSION, ROLE_PAGER, GetAnswer, HandBack,
                               HandBackCause, Hello)
from vswapcommon.sizes import PAGE_SIZE
from hoststore.clientpages import NIL, ClientPages
from hoststore.compressor import Idle, idle_from_args
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot, parse_source
from hoststore.handback import HandBackEngine, Pace
from hoststore.store import RequestError, Store, get_answer

from .pagestore import HandBackHandler, PagesLostHandler, StoreError

log = logging.getLogger("vswapfs.inproc")


class InprocStore:
    """A :class:`~vswapfs.pagestore.PageStore` holding the pages in this process."""

    address = Address(INPROC)

    def __init__(self, name: str, device_size: int, limits: Limits, sampler: Sampler | None = None, *,
                 handback_interval: float = 0.05, handback_batch: int = 256,
                 handback_rate: float = 25600.0, compress: Codec | None = None, idle: Idle = Idle(),
                 pool: str = POOL_SWAP) -> None:
        """``pool``: what the pages are to the store (``pagewire.messages.POOLS``)."""
        self.store = Store(limits, sampler or Sampler(), compress=compress, idle=idle)
        hello = Hello(PROTOCOL_VERSION, name, ROLE_PAGER, device_size, secrets.token_hex(8),
                      os.urandom(NONCE_SIZE), pool=pool)
        client, _answer, _old = self.store.attach(hello, os.urandom(NONCE_SIZE), owner=IN_PROCESS)
        assert client is not None
        self.client = client
        self.store.bind(client, self)
        self.store.connections_active = 1
        self._on_handback: HandBackHandler | None = None
        # The engine a store daemon uses, asking the pager directly; between two rounds,
        # as many batches as the rate allows, and a pager that took nothing is asked
        # again at the next round.
        per_round = max(1, int(handback_rate * handback_interval))
        self.handback = HandBackEngine(self.store, self._ask, can_ask=lambda client: self._on_handback is not None,
                                       pace=Pace(handback_batch, handback_rate, handback_interval,
                                                 rest=handback_interval, per_client=per_round))

    # -- the PageStore contract -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return True

    @property
    def epoch(self) -> int:
        return 0

    async def wait_connected(self) -> None:
        return None

    def set_handlers(self, on_handback: HandBackHandler, on_pages_lost: PagesLostHandler) -> None:
        self._on_handback = on_handback  # pages are never lost behind our back: nothing to tell

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        try:
            statuses = await self.store.put(self.client, first, seq, data)
        except RequestError as exc:
            raise StoreError(str(exc)) from None
        if self.store.policy.delay:
            await trio.sleep(self.store.policy.delay)
        return statuses

    async def get(self, pages: array) -> GetAnswer:
        try:
            return await get_answer(self.store, self.client, pages)
        except RequestError as exc:
            raise StoreError(str(exc)) from None

    async def invalidate(self, first: int, count: int, seq: int) -> int:
        try:
            return await self.store.invalidate(self.client, first, count, seq)
        except RequestError as exc:
            raise StoreError(str(exc)) from None

    def read_shared(self, page: int, seq: int, out: memoryview) -> bool:
        """Straight from the slab, as a client of a store daemon reads shared memory
        (and, as there, unseen by the store's read counters and LRU order)."""
        client = self.client
        slot = client.index.get(page)
        if slot == NIL or client.seq_of[slot] != seq:
            return False
        try:
            client.slab.read_into(slot, out)
        except DecodeError:
            return False  # the store's get decides: an answer that fails the checksum
        return True

    # -- pressure -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """While the host is under pressure, hand the least recently used pages back
        to the pager (to the backing file) at a bounded rate, as a store daemon does;
        and the store's own upkeep (its compressor, with --compress)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            task_status.started()
            await self.handback.under_pressure()

    async def hand_back(self, cause: HandBackCause, limit: int) -> int:
        """Lend up to ``limit`` of the oldest pages to the pager, free what it took;
        pages it could not take stay here.  Pages freed."""
        return await self.handback.hand_back(self.client, cause, limit)

    async def _ask(self, client: ClientPages, handback: HandBack) -> bytes:
        assert self._on_handback is not None
        return await self._on_handback(handback)

    def stats(self) -> dict[str, Any]:
        """The store's counters, as a hoststore reports them to its client."""
        return self.store.stats(self.client)

    def report(self, stats: dict[str, Any]) -> None:
        stats["inproc_store"] = self.stats()  # its counters share names with the pager's: kept apart
        stats["shared_memory"] = True

    def close(self) -> None:
        self.store.close()


def parse_pressure_source(text: str) -> Callable[[], Snapshot]:
    """``--pressure-source``: where the in-process store reads memory pressure."""
    return parse_source(text)


def from_options(args: argparse.Namespace, name: str, device_size: int, pool: str = POOL_SWAP) -> InprocStore:
    """The in-process store vswapfs's (or fscache's) options describe (``--capacity``, the
    watermarks, the source)."""
    capacity = args.capacity if args.capacity is not None else device_size
    limits = Limits(high_percent=args.high_watermark, low_percent=args.low_watermark,
                    capacity_pages=capacity // PAGE_SIZE)
    sampler = Sampler(source=args.pressure_source or parse_source("psutil"))
    return InprocStore(name, device_size, limits, sampler,
                       compress=COMPRESS_CHOICES[getattr(args, "compress", None) or DEFAULT_COMPRESS],
                       idle=idle_from_args(args) if hasattr(args, "recompress_after") else Idle(), pool=pool)
