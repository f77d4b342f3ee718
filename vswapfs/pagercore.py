"""What the pager's parts share: the device's map and locks, the store and the
backing file, the settings, the counters, and the few steps every part takes
(a fresh sequence number, a failed backing write, a page that failed its check,
a page lost)."""

from __future__ import annotations

import errno
import logging
import math

from vswapcommon.counters import Counters
from pagewire.messages import PAGE_SIZE

from .backing import Backing
from .pagemap import LOST, PageMap
from .pagercounters import BurstLog, PagerCounter
from .pagestore import PageStore
from .rangelock import RangeLock

log = logging.getLogger("vswapfs.pager")


class PagerError(Exception):
    errno = errno.EIO


class InvalidIO(PagerError):
    """Unaligned or out-of-range I/O."""

    errno = errno.EINVAL


class PageUnavailable(PagerError):
    """A page could not be produced (lost, missing, failed its check, or the store did not answer)."""

    errno = errno.EIO


class WriteFailed(PagerError):
    """Some page of a write found no home (the backing file failed too)."""

    errno = errno.EIO


class PagerCore:
    def __init__(self, backing: Backing, store: PageStore, *, write_timeout: float, read_timeout: float,
                 writethrough: bool, pressure_holdoff: float) -> None:
        if not 0 <= pressure_holdoff < math.inf:
            raise ValueError(f"pressure_holdoff must be a finite number of seconds, 0 or more, not {pressure_holdoff}")
        self.backing = backing
        self.store = store
        self.size = backing.size
        self.npages = backing.size // PAGE_SIZE
        self.map = PageMap(self.npages)
        self.locks = RangeLock()
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        self.writethrough = writethrough
        self.pressure_holdoff = pressure_holdoff
        self.held_off_until = -math.inf  # no offers before this (trio time): the store said pressure
        self.counters: Counters[PagerCounter] = Counters(PagerCounter)
        self._seq = 0
        self._bad_pages = BurstLog(log)
        self.lost_reads = BurstLog(log)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def backing_failed(self, first: int, pages: int, exc: OSError) -> None:
        self.counters.add(PagerCounter.BACKING_WRITE_ERRORS, pages)
        log.error("backing file %s failed a write of %d page(s) at page %d: %s",
                  self.backing.path, pages, first, exc)

    def mismatch(self, pages: int, where: str) -> None:
        self.counters.add(PagerCounter.CHECKSUM_ERRORS, pages)
        self._bad_pages.error("%d page(s) from %s failed their checksum or version check: refused (EIO)",
                              pages, where)

    def lose(self, page: int) -> None:
        self.map.states[page] = LOST
        self.counters.add(PagerCounter.PAGES_LOST)
        self.lost_reads.error("the store does not hold page %d, which it accepted: marked lost", page)


class Part:
    """One of the pager's parts: the shared state at hand under short names."""

    def __init__(self, core: PagerCore) -> None:
        self.core = core
        self.size = core.size
        self.map = core.map
        self.locks = core.locks
        self.store = core.store
        self.backing = core.backing
        self.counters = core.counters
