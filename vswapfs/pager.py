"""The page rules (ARCHITECTURE.md), testable without FUSE.

* A write is offered to the store as one batch; refused pages go to the
  backing file before the write returns.
* If the store is unreachable or does not answer within ``write_timeout``,
  the whole write goes to the backing file (rule 6).  A batch that timed out
  may still be applied by the store later, so the pager then asks the store
  to drop that batch's version; sequence numbers keep that request from ever
  dropping a newer version (see ``hoststore.store``).
* Never stale: a page's map entry moves to "backing" whenever its newest
  version is there, and the store drops an older copy it refuses to replace.
* A read goes where the map says; unwritten pages read as zeros; a page the
  store cannot produce is an I/O error, never zeros or an older version.
"""

from __future__ import annotations

import errno
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import trio

from hoststore.protocol import MAX_BATCH_PAGES, PAGE_SIZE, PageStatus

from .backing import Backing
from .hostclient import StoreError, StoreUnavailable
from .pagemap import BACKING, HOST, UNWRITTEN, PageMap, refused_runs

log = logging.getLogger("vswapfs.pager")

_ALL_REFUSED = b"\xff"


class PagerError(Exception):
    errno = errno.EIO


class InvalidIO(PagerError):
    """Unaligned or out-of-range I/O."""

    errno = errno.EINVAL


class PageUnavailable(PagerError):
    """A page the map places in the store could not be fetched."""

    errno = errno.EIO


def covered_pages(offset: int, length: int, npages: int) -> tuple[int, int]:
    """(first page, count) of the whole pages inside [offset, offset + length),
    clipped to the device; partial pages at either edge are not covered."""
    if offset < 0 or length <= 0:
        return 0, 0
    first = -(-offset // PAGE_SIZE)
    end = min((offset + length) // PAGE_SIZE, npages)
    return (first, end - first) if end > first else (0, 0)


class PageStore(Protocol):
    """What the pager needs of a store client (HostClient, or a fake in tests)."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes: ...

    async def get(self, pages: list[int]) -> tuple[bytes, bytes]: ...

    async def invalidate(self, first: int, count: int, seq: int) -> int: ...


@dataclass
class PagerCounters:
    """Pages unless the name says requests; refusals by the store's reason."""

    write_requests: int = 0
    read_requests: int = 0
    host_writes: int = 0
    backing_writes: int = 0
    host_reads: int = 0
    backing_reads: int = 0
    zero_reads: int = 0  # never-written pages read back as zeros
    fallback_refused: int = 0
    fallback_timeout: int = 0
    fallback_unreachable: int = 0
    fallback_error: int = 0  # the store answered the batch with an error
    refused_pressure: int = 0
    refused_capacity: int = 0
    refused_quota: int = 0
    refused_outdated: int = 0
    stale_dropped: int = 0  # pages whose host copy was superseded by a backing write
    orphan_invalidations: int = 0  # timed-out batches the store was asked to drop
    discard_requests: int = 0
    discard_pages: int = 0  # whole pages forgotten by the page map (they read as zeros again)
    discard_host_pages: int = 0  # of those, pages the store dropped
    discard_backing_pages: int = 0  # of those, pages whose blocks were released in the backing file
    io_errors: int = 0  # requests answered with an error (EIO, EINVAL)
    read_failures: int = 0  # pages the store could not produce (part of io_errors)


_REFUSAL_COUNTER = {
    PageStatus.REFUSED_PRESSURE: "refused_pressure",
    PageStatus.REFUSED_CAPACITY: "refused_capacity",
    PageStatus.REFUSED_QUOTA: "refused_quota",
    PageStatus.REFUSED_OUTDATED: "refused_outdated",
}


class Pager:
    def __init__(
        self,
        backing: Backing,
        store: PageStore,
        *,
        write_timeout: float = 1.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.backing = backing
        self.store = store
        self.size = backing.size
        self.npages = backing.size // PAGE_SIZE
        self.map = PageMap(self.npages)
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        self.counters = PagerCounters()
        self._seq = 0
        self._orphans_send, self._orphans_recv = trio.open_memory_channel[tuple[int, int, int, bool]](math.inf)

    # -- ranges -----------------------------------------------------------------

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise InvalidIO(f"I/O at {offset}+{length} is not aligned to {PAGE_SIZE} bytes")
        if offset < 0 or offset + length > self.size:
            raise InvalidIO(f"I/O at {offset}+{length} is outside the {self.size}-byte device")
        return offset // PAGE_SIZE, length // PAGE_SIZE

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- write ------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        first, n = self._pages(offset, len(data))
        self.counters.write_requests += 1
        view = memoryview(data)
        for start in range(0, n, MAX_BATCH_PAGES):
            count = min(MAX_BATCH_PAGES, n - start)
            chunk = view[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
            await self._write_batch(first + start, chunk)
        return len(data)

    async def _write_batch(self, first: int, data: memoryview) -> None:
        n = len(data) // PAGE_SIZE
        seq = self._next_seq()
        statuses = await self._offer(first, seq, data, n)
        c = self.counters
        for index, count in refused_runs(statuses):
            offset = (first + index) * PAGE_SIZE
            self.backing.pwrite(offset, data[index * PAGE_SIZE : (index + count) * PAGE_SIZE])
            c.backing_writes += count
        c.host_writes += statuses.count(PageStatus.STORED)
        c.stale_dropped += self.map.apply_statuses(first, statuses)

    async def _offer(self, first: int, seq: int, data: memoryview, n: int) -> bytes:
        """The store's per-page answer, or all-refused when it is unreachable or too slow."""
        if not self.store.connected:
            return self._fall_back(first, n, seq, "fallback_unreachable")
        with trio.move_on_after(self.write_timeout) as scope:
            try:
                statuses = await self.store.put(first, seq, data)
            except StoreUnavailable:
                return self._fall_back(first, n, seq, "fallback_unreachable")
            except StoreError as exc:
                log.error("store failed a put of %d pages: %s", n, exc)
                return self._fall_back(first, n, seq, "fallback_error", sent=True)
        if scope.cancelled_caught:
            return self._fall_back(first, n, seq, "fallback_timeout", sent=True)
        if len(statuses) != n:
            log.error("store answered %d statuses for %d pages", len(statuses), n)
            return self._fall_back(first, n, seq, "fallback_error", sent=True)
        refused = n - statuses.count(PageStatus.STORED)
        if refused:
            c = self.counters
            c.fallback_refused += refused
            for status, name in _REFUSAL_COUNTER.items():
                setattr(c, name, getattr(c, name) + statuses.count(status))
        return statuses

    def _fall_back(self, first: int, n: int, seq: int, cause: str, sent: bool = False) -> bytes:
        """The whole batch goes to the backing file.  The store may still hold a
        copy of these pages: this version, if the put was sent (it may land
        late), or an older one the map pointed at.  Either way the orphan task
        asks the store to drop versions up to ``seq``, so nothing lingers there."""
        setattr(self.counters, cause, getattr(self.counters, cause) + n)
        if sent or HOST in self.map.states[first : first + n]:
            self._orphans_send.send_nowait((first, n, seq, False))
        return _ALL_REFUSED * n

    async def drop_orphans(self) -> None:
        """Background task: ask the store to drop batches whose put timed out,
        and discards it could not take at the time.

        The store drops a page only if it never saw a version newer than the
        request's, so this can never drop a page the map points at."""
        async for first, n, seq, discard in self._orphans_recv:
            while True:
                try:
                    await self.store.wait_connected()
                    dropped = await self.store.invalidate(first, n, seq)
                    if discard:
                        self.counters.discard_host_pages += dropped
                    else:
                        self.counters.orphan_invalidations += 1
                    break
                except StoreUnavailable:
                    continue
                except StoreError as exc:
                    log.error("store failed to drop a timed-out batch: %s", exc)
                    break

    # -- read -------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read whole pages.  At or past the end of the device, reads are short."""
        if offset == self.size:
            return b""
        length = min(length, self.size - max(offset, 0))
        first, n = self._pages(offset, length)
        self.counters.read_requests += 1
        runs = list(self.map.runs(first, n))
        if len(runs) == 1 and runs[0][0] == HOST:
            return await self._fetch(list(range(first, first + n)))
        out = bytearray(n * PAGE_SIZE)
        view = memoryview(out)
        host_pages: list[int] = []
        c = self.counters
        for state, start, count in runs:
            slot = view[(start - first) * PAGE_SIZE : (start - first + count) * PAGE_SIZE]
            if state == BACKING:
                self.backing.pread_into(start * PAGE_SIZE, slot)
                c.backing_reads += count
            elif state == HOST:
                host_pages.extend(range(start, start + count))
            else:
                c.zero_reads += count
        if host_pages:
            data = await self._fetch(host_pages)
            for i, page in enumerate(host_pages):
                at = (page - first) * PAGE_SIZE
                view[at : at + PAGE_SIZE] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        return bytes(out)

    async def _fetch(self, pages: list[int]) -> bytes:
        """The pages' data from the store, all of it, or PageUnavailable.

        Waits up to ``read_timeout`` for a connection: unlike a write, a read
        has nowhere else to go, and failing it kills whoever swapped the page out.
        """
        answer: tuple[bytes, bytes] | None = None
        with trio.move_on_after(self.read_timeout):
            while answer is None:
                try:
                    await self.store.wait_connected()
                    answer = await self.store.get(pages)
                except StoreUnavailable:
                    continue
                except StoreError as exc:
                    self._read_failed(len(pages), f"store error: {exc}")
        if answer is None:
            self._read_failed(len(pages), f"no answer from the store in {self.read_timeout}s")
        status, data = answer  # type: ignore[misc]
        if len(status) != len(pages) or len(data) != len(pages) * PAGE_SIZE:
            self._read_failed(len(pages), "the store's answer does not match the request")
        missing = len(pages) - status.count(PageStatus.STORED)
        if missing:
            self._read_failed(missing, "the store does not hold pages it accepted")
        self.counters.host_reads += len(pages)
        return data

    def _read_failed(self, pages: int, why: str) -> None:
        self.counters.read_failures += pages
        log.error("cannot read %d page(s) from the store: %s", pages, why)
        raise PageUnavailable(why)

    # -- discard ----------------------------------------------------------------

    async def discard(self, offset: int, length: int) -> None:
        """Forget the whole pages in [offset, offset + length) (a freed swap slot).

        They leave the page map and read as zeros again; the store drops the
        ones it holds, in one request; their backing blocks are released.
        Partial pages at the edges are left alone, as is anything past the end.
        """
        first, n = covered_pages(offset, length, self.npages)
        c = self.counters
        c.discard_requests += 1
        if not n:
            return
        runs = list(self.map.runs(first, n))
        self.map.set_range(first, n, UNWRITTEN)
        c.discard_pages += sum(count for state, _, count in runs if state != UNWRITTEN)
        for state, start, count in runs:
            if state == BACKING and self.backing.punch(start * PAGE_SIZE, count * PAGE_SIZE):
                c.discard_backing_pages += count
        if any(state == HOST for state, _, _ in runs):
            await self._drop_from_store(first, n, self._next_seq())

    async def _drop_from_store(self, first: int, n: int, seq: int) -> None:
        """One invalidate for the whole range; if the store cannot take it now,
        the orphan task retries (the sequence number keeps that safe)."""
        dropped = None
        if self.store.connected:
            with trio.move_on_after(self.write_timeout):
                try:
                    dropped = await self.store.invalidate(first, n, seq)
                except (StoreUnavailable, StoreError):
                    pass
        if dropped is None:
            self._orphans_send.send_nowait((first, n, seq, True))
        else:
            self.counters.discard_host_pages += dropped

    # -- the rest ---------------------------------------------------------------

    async def release_all(self) -> None:
        """On clean shutdown: tell the store it may drop everything we left there."""
        if self.store.connected and self.map.counts()["host"]:
            with trio.move_on_after(self.write_timeout):
                try:
                    await self.store.invalidate(0, self.npages, self._next_seq())
                except (StoreUnavailable, StoreError) as exc:
                    log.warning("could not release pages in the store: %s", exc)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"device_bytes": self.size, "device_pages": self.npages}
        stats.update({f"pages_{k}": v for k, v in self.map.counts().items()})
        stats["host_connected"] = self.store.connected
        stats.update(asdict(self.counters))
        return stats
