"""Where the data of admitted pages lives: the contract every backend keeps, and the memory one.

The store decides (admission, versions, counters, the order of hand-back) and
keeps each client's metadata in a :class:`~hoststore.clientpages.ClientPages`;
a backend holds the data.  Two exist: :class:`MemoryPages` (this process's
memory: a private slab per client, or one shared with it) and the Redis Cluster
tier (``hoststore.tierbackend``).  The contract:

* ``new_client`` makes a client's page record (its slab decides where data goes);
  ``close_client`` frees everything of a client and says how many pages it held.
* ``keeps_data`` is true when a put's data is written into the client's slab as
  it is admitted; otherwise admission records versions only, and ``commit``
  writes the accepted pages where they live, refusing (and unrecording, through
  the store) any the backend did not take.
* ``get_into`` fills a get's answer (status, version, data) for the pages the
  client holds, touching each page read; ``lend`` picks pages to hand back, with
  their data, and lends them (``ClientPages.lend_slots``).
* ``forgotten`` hears of every stored version the store drops.
"""

from __future__ import annotations

from array import array
import dataclasses
import logging
import time
from typing import Any, Protocol

import trio

from pagewire import auth
from pagewire.codec import DecodeError
from pagewire.messages import PAGE_SIZE, HandBack, HandBackCause, PageStatus

from .clientpages import NIL, ClientPages
from .compressor import Compressor
from .hostcounters import HostCounter
from .pressure import Snapshot
from .sizeclasses import Tally

log = logging.getLogger("hoststore")


@dataclasses.dataclass
class PutPlan:
    """A put's decisions: a status per page, and which pages were recorded as stored."""

    first: int
    n: int
    seq: int
    out: bytearray
    snapshot: Snapshot
    accepted: list[int] = dataclasses.field(default_factory=list)  # batch indices recorded as stored
    replaced: list[int] = dataclasses.field(default_factory=list)  # of those, over an older version


class Bookkeeper(Protocol):
    """What a backend may ask of the store it serves (``hoststore.store.Store``)."""

    instance: str
    draining: bool
    clients: dict[str, ClientPages]
    compressor: Compressor
    tally: Tally

    def next_stamp(self) -> int: ...

    def count(self, client: ClientPages, cause: HostCounter, n: int = 1) -> None: ...

    def drop(self, client: ClientPages, slot: int) -> None: ...


class PageBackend(Protocol):
    keeps_data: bool  # a put's data goes into the client's slab as it is admitted
    shares_memory: bool  # clients on a unix socket may map their pages (the data is in our memory)

    def bind(self, store: Bookkeeper) -> None: ...

    def new_client(self, name: str, npages: int, instance: str, shared_slots: int, max_slots: int = 0
                   ) -> ClientPages: ...

    def close_client(self, client: ClientPages) -> int: ...

    async def commit(self, client: ClientPages, plan: PutPlan, data: bytes | memoryview) -> None: ...

    async def get_into(self, client: ClientPages, pages: array, status: bytearray | memoryview, seqs: memoryview,
                       data: bytearray | memoryview) -> int: ...

    async def lend(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None: ...

    def forgotten(self, client: ClientPages, page: int, seq: int) -> None: ...

    def stats(self) -> dict[str, Any] | None: ...

    async def run(self, store: Bookkeeper, server: Any, *, task_status: trio.TaskStatus[None]) -> None: ...

    async def aclose(self) -> None: ...


class MemoryPages:
    """Pages in this process's memory: each client's slab, private or shared with it."""

    keeps_data = True
    shares_memory = True

    def __init__(self) -> None:
        self.store: Bookkeeper | None = None

    def bind(self, store: Bookkeeper) -> None:
        self.store = store

    def new_client(self, name: str, npages: int, instance: str, shared_slots: int, max_slots: int = 0
                   ) -> ClientPages:
        return ClientPages(name, npages, instance, auth.new_secret(), shared_slots=shared_slots,
                           compress=self.store.compressor.codec if self.store is not None else None,
                           max_slots=max_slots, tally=self.store.tally if self.store is not None else None)

    def close_client(self, client: ClientPages) -> int:
        return client.close()

    async def commit(self, client: ClientPages, plan: PutPlan, data: bytes | memoryview) -> None:
        """Nothing to do: the pages went into the slab as they were admitted."""

    async def get_into(self, client: ClientPages, pages: array, status: bytearray | memoryview, seqs: memoryview,
                       data: bytearray | memoryview) -> int:
        """Copy each page held into the answer (``status`` zeroed: STORED); pages read.
        A page that does not decode goes as version 0, which no client holds: the client
        counts a checksum error and fails the read (EIO), and no data that is not the
        page can pass for it."""
        assert self.store is not None
        stamp = self.store.next_stamp()
        index, read_into, seq_of = client.index, client.slab.read_into, client.seq_of
        out = memoryview(data)
        hits = 0
        start = time.perf_counter_ns()
        for i, page in enumerate(pages):
            slot = index.get(page)
            if slot == NIL:
                status[i] = PageStatus.MISSING
                continue
            try:
                read_into(slot, out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            except DecodeError as exc:
                self._damaged(client, page, exc)
                out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
                continue
            seqs[i] = seq_of[slot]
            client.touch(slot, stamp)
            hits += 1
        if client.compress is not None:
            self.store.compressor.decompress_ns += time.perf_counter_ns() - start
        return hits

    async def lend(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None:
        """The client's least recently used pages, with their data.  A page that does
        not decode is not handed back: it is dropped (a read of it then fails, EIO)."""
        assert self.store is not None
        pages, seqs, data, damaged = client.lend_oldest(limit)
        for page in sorted((client.page_of[s] for s in damaged)):
            self._damaged(client, page, DecodeError("while handing it back"))
            self.store.drop(client, client.index.get(page))
        return HandBack(cause, pages, seqs, data) if pages else None

    def _damaged(self, client: ClientPages, page: int, exc: DecodeError) -> None:
        assert self.store is not None
        self.store.count(client, HostCounter.DECODE_ERRORS)
        log.error("client %r: page %d does not decode (%s): it is damaged in the store's memory",
                  client.name, page, exc)

    def forgotten(self, client: ClientPages, page: int, seq: int) -> None:
        """Nothing to do: the slab forgot the data with the page."""

    def stats(self) -> dict[str, Any] | None:
        return None

    async def run(self, store: Bookkeeper, server: Any, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """No upkeep: memory needs none."""
        task_status.started()

    async def aclose(self) -> None:
        """Nothing outlives the process."""
