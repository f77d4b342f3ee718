"""The store contract the pager uses, and its exceptions.

Every store the pager can sit on implements :class:`PageStore`: the msgpack
client of a hoststore (``vswapfs.hostclient``), and the tests' fake store.
The pager never learns which one it has.

The contract, beyond the method signatures:

* A call on a store that is not connected fails at once with
  :class:`StoreUnavailable`; the store never waits on its own, callers put the
  deadline around each call.
* ``get`` answers carry the version (sequence number) of every page returned;
  the pager checks it and the page's checksum, so a store is never trusted to
  say what a page is.
* ``epoch`` changes whenever the pages the store held for this client are
  gone (the store came back as a new instance, or forgot this client).  The
  store calls the ``on_pages_lost`` handler *before* it serves anything on
  the new connection, so the pager can mark exactly those pages lost.
* ``read_shared`` copies one page's given version straight from memory the
  store shares with us, without a round trip, or says it cannot (False: the
  page is not there in that version, or it changed during the copy); the
  pager still checks the copy's checksum, and asks with ``get`` otherwise.
  A store without shared memory always says False.
* The store may ask for pages back (``on_handback``); the handler answers
  one :class:`~pagewire.messages.TakeStatus` per page, and the store frees a
  page only after that answer.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from pagewire.address import Address
from pagewire.messages import GetAnswer, HandBack


class StoreUnavailable(Exception):
    """No connection to the store, or it was lost while the request was in flight."""


class StoreError(Exception):
    """The store answered the request with an error, or answered nonsense."""


HandBackHandler = Callable[[HandBack], Awaitable[bytes]]
PagesLostHandler = Callable[[], None]


class StoreAuthError(StoreError):
    """The peer at the store's address could not prove it is the store: nothing is sent to it."""


class PageStore(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def epoch(self) -> int: ...

    async def wait_connected(self) -> None: ...

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes: ...

    async def get(self, pages: array) -> GetAnswer: ...

    async def invalidate(self, first: int, count: int, seq: int) -> int: ...

    def read_shared(self, page: int, seq: int, out: memoryview) -> bool: ...

    def set_handlers(self, on_handback: HandBackHandler, on_pages_lost: PagesLostHandler) -> None: ...


class StoreClient(PageStore, Protocol):
    """A store as vswapfs runs one: the pager's contract, plus what the daemon around it needs."""

    address: Address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    def report(self, stats: dict[str, Any]) -> None:
        """Add this store's own figures to vswapfs's stats."""

    def close(self) -> None: ...
