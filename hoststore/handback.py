"""The one hand-back engine: lend → ask → settle → unlend, and the pressure loop around it.

A store gives pages back to their client when it wants its memory: the client
writes them to its backing file and answers one ``TakeStatus`` per page; only
then does the store free them.  Every way of handing back goes through
:meth:`HandBackEngine.hand_back`:

* the pressure loop (:meth:`HandBackEngine.under_pressure`): while the host is above
  its high watermark (until it falls to the low one), the least recently used
  pages, clients over their quota or share first (``Store.handback_order``), at
  a bounded rate; one request in flight per client, and a client that took
  nothing rests a while;
* a store daemon's drain and a page tier's rescue of unreplicated pages
  (``hoststore.server``, ``hoststore.tierbackend``), with their own pace.

How the client is asked is the caller's: a store daemon asks over the client's
connection, the in-process store asks the pager directly.  Pages lent and not
answered for (a lost connection, a timeout, an error) stay stored.

An ephemeral pool is never asked: its pages are dropped instead, at once
(``hoststore.ephemeral``), and under pressure they all go before any swap page
is handed back, up to ``Pace.drop_per_round`` a round.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from pagewire.causes import DropCause
from pagewire.messages import HandBack, HandBackCause

from . import ephemeral
from .clientpages import ClientPages
from .hostcounters import HostCounter
from .store import Store

log = logging.getLogger("hoststore")

# The client's per-page answer to a hand-back; None: the client cannot be asked now.
Ask = Callable[[ClientPages, HandBack], Awaitable[bytes]]


DROP_CHUNK = 4096  # ephemeral pages dropped between two turns of the event loop


@dataclass(frozen=True)
class Pace:
    """How fast pressure takes pages back."""

    batch: int = 256  # pages per hand-back request
    rate: float = 25600.0  # pages per second, all clients together
    interval: float = 0.05  # how often pressure is checked
    rest: float = 5.0  # a client that took nothing back is left alone this long
    per_client: int | None = None  # pages per client per round, in batches (default: one batch)
    drop_per_round: int = 262144  # ephemeral pages dropped per round under pressure (1 GiB; 4096 between turns)
    drop_chunk: int = DROP_CHUNK


# What a hand-back of an ephemeral pool's pages is instead: a drop, for the same reason.
# (Pages on a tier's master without a replica are left where they are: losing them loses nothing.)
DROP_INSTEAD = {HandBackCause.PRESSURE: DropCause.PRESSURE, HandBackCause.DRAIN: DropCause.DRAIN}


class HandBackEngine:
    def __init__(self, store: Store, ask: Ask, *, can_ask: Callable[[ClientPages], bool] = lambda c: True,
                 refused: tuple[type[BaseException], ...] = (), pace: Pace = Pace()) -> None:
        """``ask`` asks a client to take pages back; ``can_ask`` says whether it can be asked
        now; exceptions in ``refused`` mean the client did not take them (logged as such;
        any other is an error, counted in ``handback_errors``)."""
        self.store = store
        self.ask = ask
        self.can_ask = can_ask
        self.refused = refused
        self.pace = pace
        self._returned = trio.Event()  # set (and replaced) whenever a hand-back's pages are no longer lent

    async def hand_back(self, client: ClientPages, cause: HandBackCause, limit: int) -> int:
        """Lend up to ``limit`` of the client's pages, ask it to take them, settle with its
        answer.  Pages freed; pages without an answer stay stored."""
        store = self.store
        if client.ephemeral:
            drop = DROP_INSTEAD.get(cause)
            return ephemeral.drop_oldest(store, client, limit, drop) if drop is not None else 0
        if not self.can_ask(client):
            return 0
        try:
            handback = await store.lend(client, cause, limit)
        except Exception:  # noqa: BLE001 - a bug here must not take every client's pages down
            store.counters.add(HostCounter.HANDBACK_ERRORS)
            log.exception("could not pick pages of client %r to hand back", client.name)
            return 0
        if handback is None:
            return 0
        try:
            return store.settle(client, handback, await self.ask(client, handback))
        except self.refused as exc:
            log.warning("client %r did not take %d pages back (%s): they stay here",
                        client.name, len(handback.pages), str(exc) or type(exc).__name__)
        except Exception:  # noqa: BLE001
            store.counters.add(HostCounter.HANDBACK_ERRORS)
            log.exception("error handing %d pages back to client %r: they stay here",
                          len(handback.pages), client.name)
        finally:
            store.unlend(client, handback)  # whatever is still lent (no answer, or an error) stays stored
            self._returned.set()
            self._returned = trio.Event()
        return 0

    async def returned(self) -> None:
        """Until some hand-back's pages are no longer lent."""
        await self._returned.wait()

    async def under_pressure(self) -> None:
        """Until cancelled: while the host is under pressure, hand the least recently used
        pages back at the pace's rate.  Each client has at most one hand-back task at a
        time, so a client slow to answer (or that never does) holds up only itself."""
        pace = self.pace
        per_round = max(1, int(pace.rate * pace.interval))
        busy: set[str] = set()
        resting: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(pace.interval)
                try:
                    if await self._drop_ephemeral() and ephemeral.pages(self.store):
                        continue  # swap pages wait while ephemeral ones are left (a round drops 1 GiB)
                    budget = per_round
                    for client in self._candidates(busy, resting):
                        if budget <= 0:
                            break
                        limit = min(budget, pace.per_client or pace.batch)
                        budget -= limit
                        busy.add(client.name)
                        nursery.start_soon(self._take_from, client, limit, busy, resting)
                except Exception:  # noqa: BLE001
                    self.store.counters.add(HostCounter.HANDBACK_ERRORS)
                    log.exception("error in the pressure hand-back loop; going on")

    async def _drop_ephemeral(self) -> bool:
        """Under pressure, ephemeral pages go first, instantly: up to ``drop_per_round`` of
        them, the least recently used first, while the pressure lasts.  True if any went."""
        store, pace = self.store, self.pace
        dropped = 0
        while (dropped < pace.drop_per_round and ephemeral.pages(store) and not store.draining
               and store.update_pressure()):
            dropped += ephemeral.drop_lru(store, min(pace.drop_chunk, pace.drop_per_round - dropped),
                                          DropCause.PRESSURE)
            await trio.lowlevel.checkpoint()
        return dropped > 0

    def _candidates(self, busy: set[str], resting: dict[str, float]) -> list[ClientPages]:
        store = self.store
        if store.draining or not store.pages or not store.update_pressure():
            return []
        now = trio.current_time()
        return [c for c in store.handback_order() if c.name not in busy and resting.get(c.name, 0.0) <= now]

    async def _take_from(self, client: ClientPages, limit: int, busy: set[str], resting: dict[str, float]) -> None:
        """One request to one client; with ``per_client``, more while it takes pages, the
        pressure lasts and ``limit`` allows.  A client that took none rests."""
        store = self.store
        try:
            while True:
                freed = await self.hand_back(client, HandBackCause.PRESSURE, min(limit, self.pace.batch))
                if not freed:
                    resting[client.name] = trio.current_time() + self.pace.rest
                    return
                limit -= freed
                if self.pace.per_client is None or limit <= 0 or not (store.pages and store.update_pressure()):
                    return
        finally:
            busy.discard(client.name)
