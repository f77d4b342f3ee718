"""Fair shares of the store's time between connections (start-time fair queuing).

Every request costs work (pages moved or dropped, plus one for the request);
each connection's *virtual time* advances by the work it is served.  A
connection may start a request only while its virtual time is within
``quantum`` of the least among the connections that are *ready* (a request in
hand, waiting for the store's time).  So a client sending 8-page batches is
served at once even while others stream the largest ``get``\\ s or huge
``invalidate``\\ s: they wait for it, not it for them.

A connection that is not ready — reading its next request, or blocked sending
answers its peer does not read — does not hold the floor down (no peer can
stall the others by not reading), but keeps its virtual time: it comes back at
``max(its own, the floor)``, so being slow to read earns no credit, and a quiet
client earns no burst that would starve the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

DEFAULT_QUANTUM = 512.0  # pages: two of the largest batches before waiting for the others
# A connection that just went idle still counts as ready this long: a client
# sending request after request (each waiting for the last answer) is idle
# between them for a round trip, and heavy streams must not take the store in
# that gap, or its next request waits behind all of them.
DEFAULT_GRACE = 0.005


class FairShare:
    def __init__(self, quantum: float = DEFAULT_QUANTUM, grace: float = DEFAULT_GRACE,
                 on_wait: Callable[[], None] | None = None) -> None:
        self.on_wait = on_wait
        self.quantum = quantum
        self.grace = grace
        self._vtime: dict[object, float] = {}  # every open connection
        self._ready: set[object] = set()
        self._resting: dict[object, float] = {}  # went idle at (still counted for ``grace``)
        self._floor = 0.0  # never moves back
        self._changed = trio.Event()
        self.waits = 0  # times a connection waited for others (for tests and stats)

    def floor(self) -> float:
        if self._resting:
            now = trio.current_time()
            for who in [w for w, since in self._resting.items() if now - since >= self.grace]:
                del self._resting[who]
        if self._ready or self._resting:
            self._floor = max(self._floor, min(self._vtime[w] for w in (*self._ready, *self._resting)))
        return self._floor

    async def turn(self, who: object, cost: float) -> None:
        """Wait until ``who`` may start a request of ``cost``; then charge it."""
        if who not in self._ready:
            if self._resting.pop(who, None) is None:  # back from idle: no credit for the time away
                self._vtime[who] = max(self._vtime.get(who, 0.0), self.floor())
            self._ready.add(who)
        while self._vtime.get(who, 0.0) > self.floor() + self.quantum:
            self.waits += 1
            if self.on_wait is not None:
                self.on_wait()
            changed = self._changed
            with trio.move_on_after(self.grace if self._resting else float("inf")):
                await changed.wait()
        if who not in self._vtime:  # forgotten while it waited: its connection is gone
            return
        before = self._vtime[who]
        self._vtime[who] = before + cost
        if before <= self._floor:  # it held the floor: others may go now
            self._wake()

    def idle(self, who: object) -> None:
        """``who`` is not waiting for the store's time (reading, or blocked sending)."""
        if who in self._ready:
            self._ready.discard(who)
            if self.grace > 0:
                self._resting[who] = trio.current_time()
            self._wake()

    def forget(self, who: object) -> None:
        self._ready.discard(who)
        self._resting.pop(who, None)
        self._vtime.pop(who, None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
