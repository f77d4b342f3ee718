"""The store's hand-backs, as vswapfs's link to a store daemon takes them.

Each hand-back is served in a task of the client's own nursery (a lost
connection does not cut it short), at most ``HANDBACK_CONCURRENCY`` at once and
``HANDBACK_PENDING_MAX`` held; beyond that the store is answered "failed" at
once and keeps its pages.  Pages taken whose answer could not be sent are
dropped at the store, one version at a time, once connected again.
"""

from __future__ import annotations

import logging

import trio

from pagewire import protocol as p
from pagewire.endpoint import Endpoint, PeerGone, RemoteError
from pagewire.messages import HandBack, Invalidate, TakeStatus
from vswapcommon.counters import Counters

from .linkcounters import LinkCounter
from .pagestore import HandBackHandler

log = logging.getLogger("vswapfs.hostclient")

HANDBACK_CONCURRENCY = 2  # hand-backs being applied at once
HANDBACK_PENDING_MAX = 4  # held at once (applied or waiting); more are answered "failed" at once


class HandBackTaker:
    def __init__(self, counters: Counters[LinkCounter]) -> None:
        self.counters = counters
        self.on_handback: HandBackHandler | None = None
        self.tasks: trio.Nursery | None = None  # the client's: hand-backs outlive a connection
        self.endpoint: Endpoint | None = None  # the connection up now, if any
        self._slots = trio.Semaphore(HANDBACK_CONCURRENCY)
        self._pending = 0
        # (page, version) the store handed back and we took, whose answer never reached
        # it: the store still holds them, so they are dropped there after a reconnect.
        self._untold: list[tuple[int, int]] = []
        self._telling = False

    def receive(self, endpoint: Endpoint, msgid: int, handback: HandBack, nursery: trio.Nursery) -> None:
        """A hand-back arrived on ``endpoint``: served in its own task, or refused at once."""
        self.counters.add(LinkCounter.HANDBACK_REQUESTS)
        if self._pending >= HANDBACK_PENDING_MAX or self.tasks is None:
            # Bounded: a store cannot make us hold more than a few batches.  It keeps
            # these pages and may offer them again later.  The answer goes out from its
            # own task: the receive loop must keep reading whatever the store does, or a
            # store that stops reading while it sends could wedge both ends.
            self.counters.add(LinkCounter.HANDBACKS_DEFERRED)
            statuses = bytes([TakeStatus.FAILED]) * len(handback.pages)
            nursery.start_soon(self._answer, endpoint, endpoint.conn.send_answer(msgid, handback, statuses))
            return
        self._pending += 1
        self.tasks.start_soon(self._take_back, endpoint, msgid, handback)

    def connected(self, endpoint: Endpoint | None) -> None:
        """A connection is up (or, with None, gone); untold pages are told on it."""
        self.endpoint = endpoint
        if endpoint is not None:
            self._tell_untold_soon()

    @staticmethod
    async def _answer(endpoint: Endpoint, data: bytes) -> None:
        try:
            await endpoint.send(data)
        except PeerGone:
            pass

    async def _take_back(self, endpoint: Endpoint, msgid: int, handback: HandBack) -> None:
        """Serve one hand-back: the pages are saved whether or not the answer gets out.
        If it cannot be sent, the store still holds the pages we took: they are
        dropped there once we are connected again."""
        # This runs in the client's nursery, not the connection's: a lost connection
        # does not cut it short.  Only shutting the client down cancels it, and the
        # pager's take_back is safe to cancel (the map moves only after the write).
        try:
            async with self._slots:
                if self.on_handback is None:
                    statuses = bytes([TakeStatus.FAILED]) * len(handback.pages)
                else:
                    statuses = await self.on_handback(handback)
        finally:
            self._pending -= 1
        try:
            await endpoint.send(endpoint.conn.send_answer(msgid, handback, statuses))
        except (PeerGone, p.ProtocolError):
            taken = [(page, seq) for page, seq, status in zip(handback.pages, handback.seqs, statuses, strict=True)
                     if status != TakeStatus.FAILED]
            self._untold.extend(taken)
            self.counters.add(LinkCounter.HANDBACK_ANSWERS_LOST, len(taken))
            log.warning("could not answer a hand-back of %d pages (the connection is gone): the store's "
                        "copies will be dropped once connected", len(handback.pages))
            self._tell_untold_soon()

    def _tell_untold_soon(self) -> None:
        if self._untold and not self._telling and self.tasks is not None and self.endpoint is not None:
            self._telling = True
            self.tasks.start_soon(self._tell_untold, self.endpoint)

    async def _tell_untold(self, endpoint: Endpoint) -> None:
        """Drop, one version at a time, the store's copies of pages we took back but
        could not say so.  A newer version the store holds is never touched."""
        try:
            while self._untold:
                page, seq = self._untold[-1]
                try:
                    await endpoint.request(Invalidate(page, 1, seq))
                except RemoteError as exc:
                    log.error("the store refused to drop a page we took back: %s", exc)
                except PeerGone:
                    return
                self._untold.pop()
        finally:
            self._telling = False
