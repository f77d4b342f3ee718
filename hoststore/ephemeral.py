"""Ephemeral pools: pages the store may drop at any time, asking no one.

A client whose hello names ``POOL_EPHEMERAL`` keeps clean data here (file
pages that are also on disk, as tmem's ephemeral pools did): losing one costs
its client a read from elsewhere, never data.  So the store never hands such
pages back; it drops them, writing nothing, and counts why
(``pagewire.causes.DROP_CAUSES``):

* under memory pressure, all of them go before any swap page is handed back
  (``HandBackEngine``);
* at the capacity, they make way for newer pages of any pool: the least
  recently used of every ephemeral pool, down to below the reserve where
  weighted shares start to refuse (``policy.FAIR_RESERVE``);
* at an ephemeral client's quota, its own least recently used make way for
  its newer ones (an LRU cache of that size);
* a drain drops them instead of handing them back.

Everything else (admission, policies, compression, shared memory, a page
tier, the counters) is as for swap pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pagewire.causes import DropCause

from .clientpages import NIL, ClientPages
from .hostcounters import DROP_COUNTER, HostCounter
from .policy import FAIR_RESERVE, ClientTerms, Limits
from .trace import Trace


class Store(Protocol):
    """What dropping needs of the store (``hoststore.store.Store``)."""

    limits: Limits
    trace: Trace

    @property
    def clients(self) -> Mapping[str, ClientPages]: ...

    def charged_pages(self) -> int: ...

    def drop(self, client: ClientPages, slot: int) -> None: ...

    def count(self, client: ClientPages, cause: HostCounter, n: int = 1) -> None: ...

DROP_RUN = 256  # pages a put may drop beyond its own number (after a capacity or quota was lowered)


def pages(store: Store) -> int:
    """Pages held for ephemeral pools, all clients together."""
    return sum(c.count for c in store.clients.values() if c.ephemeral)


def make_room(store: Store, client: ClientPages, first: int, n: int, terms: ClientTerms, used: int) -> bool:
    """Before a put of ``n`` pages from ``first`` by ``client``, with ``used`` charged
    pages held: ephemeral pages make way for those of the put that are new (a page
    stored already costs no room).  Bounded: at most ``n + DROP_RUN`` pages per put,
    and in charged pages, so that compressed pages free what they cost.  Whether
    anything was dropped (the caller counts ``used`` again)."""
    room = int(store.limits.capacity_pages * (1 - FAIR_RESERVE))
    quota = terms.quota_pages if client.ephemeral else None
    if used + n <= room and (quota is None or client.charged_pages + n <= quota):
        return False  # the usual case: no page of the put is looked up
    if not any(_droppable(c) for c in store.clients.values()):
        return False
    index = client.index
    new = sum(1 for page in range(first, first + n) if index.get(page) == NIL)
    if not client.ephemeral and terms.quota_pages is not None:  # what its quota refuses needs no room
        new = min(new, max(0, terms.quota_pages - client.charged_pages))
    budget = n + DROP_RUN
    dropped = 0
    while new and dropped < budget and store.charged_pages() + new > room:
        got = drop_lru(store, min(store.charged_pages() + new - room, budget - dropped), DropCause.CAPACITY)
        if not got:
            break
        dropped += got
    while new and quota is not None and dropped < budget and client.charged_pages + new > quota:
        got = drop_oldest(store, client, min(client.charged_pages + new - quota, budget - dropped), DropCause.QUOTA)
        if not got:
            break
        dropped += got
    return dropped > 0


def _droppable(client: ClientPages) -> bool:
    """An ephemeral client with a least recently used page that is not lent out."""
    return client.ephemeral and client.tail != NIL and not client.lent[client.tail]


def drop_oldest(store: Store, client: ClientPages, limit: int, cause: DropCause, older_than: int | None = None) -> int:
    """Drop up to ``limit`` of an ephemeral client's least recently used pages (only
    those last used before stamp ``older_than``, if given, but always one); how many
    went.  Never a swap page (ValueError: a bug)."""
    if not client.ephemeral:
        raise ValueError(f"client {client.name!r} keeps swap pages: they are never dropped")
    dropped = 0
    while dropped < limit and _droppable(client) and (
            older_than is None or not dropped or client.stamp[client.tail] < older_than):
        store.drop(client, client.tail)
        dropped += 1
    if dropped:
        store.count(client, DROP_COUNTER[cause], dropped)
        if store.trace.active:
            store.trace.emit("drop", client=client.name, cause=str(cause), pages=dropped)
    return dropped


def drop_lru(store: Store, limit: int, cause: DropCause) -> int:
    """Drop up to ``limit`` ephemeral pages of all clients, the least recently used first:
    from the client whose oldest page is oldest, until its next is newer than another's."""
    dropped = 0
    while dropped < limit:
        held = sorted((c for c in store.clients.values() if _droppable(c)), key=lambda c: c.stamp[c.tail])
        if not held:
            break
        older_than = held[1].stamp[held[1].tail] if len(held) > 1 else None
        dropped += drop_oldest(store, held[0], limit - dropped, cause, older_than)
    return dropped
