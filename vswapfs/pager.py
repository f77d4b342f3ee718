"""The pager: the page rules, testable without FUSE, as a façade over its parts.

The parts: :mod:`~vswapfs.writer` (writes and placement), :mod:`~vswapfs.reader`
(reads and verification), :mod:`~vswapfs.takeback` (the store's hand-backs and
lost pages), :mod:`~vswapfs.drops` (orphan, discard and shutdown drops), sharing
:class:`~vswapfs.pagercore.PagerCore`.  The rules (docs/architecture.md):


* A write is offered to the store as one batch; refused pages go to the
  backing file before the write returns.  With ``writethrough`` every page
  also goes to the backing file, and the store is only a cache.
* If the store is unreachable or does not answer within ``write_timeout``,
  the whole write goes to the backing file.  If it refused a whole batch for
  memory pressure, batches go straight to the backing file for
  ``pressure_holdoff`` seconds: under pressure each offer costs both daemons
  a round trip that ends the same way.  A batch that timed out may still
  be applied by the store later, so the pager then asks the store to drop
  that version; sequence numbers keep that request from ever dropping a
  newer version.
* Never stale: a page's map entry moves to the backing file whenever its
  newest version is there, and the store drops an older copy it refuses to
  replace.
* Same-filled pages (every 8-byte word equal, zero pages included), as zram
  keeps them: the map holds the fill word, and the page goes neither to the
  store nor to the backing file, in either mode; the rest of the batch is
  offered as contiguous runs.  If the store held an older version, a drop
  request is queued for it with a fresh sequence number, so it can never
  drop a newer one; until it lands, the map already reads the fill.
* A read goes where the map says, and what it returns is checked: the
  version the store names and the page's checksum must match the map's.  A
  page never written reads as zeros, a same-filled page as its fill word; a
  page that cannot be produced is an I/O error, never zeros and never another
  version.
* Pages known to be gone (the store came back without them, or says it does
  not hold them) are marked lost: reads of them fail at once, until rewritten.
* The store may hand pages back: they are checked, written to the backing
  file, and the map moves only where the version still matches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pagewire.messages import HandBack

from .backing import Backing
from .drops import Drops, covered_pages
from .pagemap import PageMap
from .pagercore import InvalidIO, PagerCore, PagerError, PageUnavailable, WriteFailed
from .pagercounters import PagerCounter
from .pagestore import PageStore
from .reader import Reader
from .rangelock import RangeLock
from .takeback import TakeBack
from .writer import Writer

__all__ = ["InvalidIO", "Pager", "PagerCounter", "PagerError", "PageUnavailable", "WriteFailed", "covered_pages"]


class Pager:
    """A device's pages: where each lives, and the rules that move it."""

    def __init__(self, backing: Backing, store: PageStore, *, write_timeout: float = 1.0,
                 read_timeout: float = 30.0, writethrough: bool = False, pressure_holdoff: float = 1.0) -> None:
        self.core = core = PagerCore(backing, store, write_timeout=write_timeout, read_timeout=read_timeout,
                                     writethrough=writethrough, pressure_holdoff=pressure_holdoff)
        self.drops = Drops(core)
        self.writer = Writer(core, self.drops)
        self.reader = Reader(core)
        self.takeback = TakeBack(core)
        store.set_handlers(self.takeback.take_back, self.takeback.pages_lost)
        # The entry points are the parts' own methods: the facade adds no call to the page path.
        self.write: Callable[[int, bytes | memoryview], Awaitable[int]] = self.writer.write
        self.read: Callable[[int, int], Awaitable[bytes]] = self.reader.read
        self.discard: Callable[[int, int], Awaitable[None]] = self.drops.discard
        self.take_back: Callable[[HandBack], Awaitable[bytes]] = self.takeback.take_back
        self.pages_lost: Callable[[], None] = self.takeback.pages_lost
        # Background task: send the queued drop requests (timed-out puts, discards, same-filled pages).
        self.drop_orphans: Callable[[], Awaitable[None]] = self.drops.run
        # On clean shutdown: tell the store it may drop everything left there.
        self.release_all: Callable[[], Awaitable[None]] = self.drops.release_all

    # What the device is, for its users (fs.py, the tests, the benchmarks).
    backing: Backing = property(lambda self: self.core.backing)  # type: ignore[assignment]
    store: PageStore = property(lambda self: self.core.store)  # type: ignore[assignment]
    map: PageMap = property(lambda self: self.core.map)  # type: ignore[assignment]
    locks: RangeLock = property(lambda self: self.core.locks)  # type: ignore[assignment]
    counters = property(lambda self: self.core.counters)
    size: int = property(lambda self: self.core.size)  # type: ignore[assignment]
    npages: int = property(lambda self: self.core.npages)  # type: ignore[assignment]
    writethrough: bool = property(lambda self: self.core.writethrough)  # type: ignore[assignment]
    orphans_pending: int = property(lambda self: self.drops.pending)  # type: ignore[assignment]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"device_bytes": self.core.size, "device_pages": self.core.npages,
                                 "writethrough": self.core.writethrough}
        stats.update({f"pages_{k}": v for k, v in self.core.map.counts().items()})
        stats["host_connected"] = self.core.store.connected
        stats["orphans_pending"] = self.drops.pending
        stats.update(self.core.counters.as_dict())
        return stats
