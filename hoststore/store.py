"""Pages in RAM, per client, with the counters.

Pages live in a :class:`Slab` of fixed 4 KiB slots (anonymous mmap chunks,
mapped as the store grows), and each client has two compact arrays indexed by
page number: the slot holding the page (-1 = not here) and the sequence
number of the newest version the client ever sent for that page.  No Python
object exists per stored page.

The sequence numbers make the store safe against requests that arrive late:
a put that timed out on the client (which then wrote the page to its backing
file) may still reach the store after a newer version was written.  The
store refuses any put or invalidate older than what it has seen for a page,
so an old version can never overwrite or outlive a newer one.
"""

from __future__ import annotations

import mmap
import secrets
from array import array
from dataclasses import asdict, dataclass

from .policy import Limits, admit, under_pressure
from .pressure import Sampler
from .protocol import PAGE_SIZE, PageStatus

CHUNK_PAGES = 8192  # 32 MiB per mmap chunk


class Slab:
    """Fixed-size page slots, allocated on demand up to ``capacity_pages``.

    Freed slots are reused; the mapping does not shrink.
    """

    def __init__(self, capacity_pages: int, chunk_pages: int = CHUNK_PAGES) -> None:
        self.capacity = capacity_pages
        self.chunk_pages = chunk_pages
        self._chunks: list[mmap.mmap] = []
        self._free = array("q")
        self._handed_out = 0  # slots ever taken from fresh chunk space
        self.used = 0

    def alloc(self) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self._handed_out >= self.capacity:
                raise MemoryError("slab full")
            slot = self._handed_out
            if slot // self.chunk_pages >= len(self._chunks):
                self._chunks.append(mmap.mmap(-1, self.chunk_pages * PAGE_SIZE))
            self._handed_out += 1
        self.used += 1
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self.used -= 1

    def write(self, slot: int, page: memoryview) -> None:
        chunk, index = divmod(slot, self.chunk_pages)
        off = index * PAGE_SIZE
        self._chunks[chunk][off : off + PAGE_SIZE] = page

    def read(self, slot: int) -> memoryview:
        chunk, index = divmod(slot, self.chunk_pages)
        off = index * PAGE_SIZE
        return memoryview(self._chunks[chunk])[off : off + PAGE_SIZE]

    @property
    def mapped_bytes(self) -> int:
        return len(self._chunks) * self.chunk_pages * PAGE_SIZE

    def close(self) -> None:
        for chunk in self._chunks:
            chunk.close()
        self._chunks.clear()


class ClientPages:
    """One client's page index.  ``session`` tells a reconnect from a new instance."""

    def __init__(self, name: str, npages: int, session: str) -> None:
        self.name = name
        self.npages = npages
        self.session = session
        self.slots = array("q", [-1]) * npages
        self.seqs = array("Q", [0]) * npages
        self.count = 0
        self.connected = 0


@dataclass
class HostCounters:
    """Counted by cause, like zswap's debugfs counters."""

    accepted: int = 0
    replaced: int = 0  # accepted pages that overwrote an older stored version
    refused_pressure: int = 0
    refused_capacity: int = 0
    refused_quota: int = 0
    refused_outdated: int = 0
    stale_dropped: int = 0  # stored copies dropped because their new version was refused
    reads: int = 0
    misses: int = 0
    invalidated: int = 0
    dropped_sessions: int = 0  # pages dropped because a client came back as a new instance
    put_requests: int = 0
    get_requests: int = 0
    invalidate_requests: int = 0
    connections: int = 0
    connections_active: int = 0
    protocol_errors: int = 0
    hello_refused: int = 0


_REFUSAL_COUNTER = {
    PageStatus.REFUSED_PRESSURE: "refused_pressure",
    PageStatus.REFUSED_CAPACITY: "refused_capacity",
    PageStatus.REFUSED_QUOTA: "refused_quota",
}


class RequestError(Exception):
    """A well-formed request the store cannot serve (answered with an error, connection stays)."""


class Store:
    """All clients' pages and the admission state, behind a small interface:
    :meth:`attach`, :meth:`put`, :meth:`get`, :meth:`invalidate`, :meth:`stats`."""

    def __init__(self, limits: Limits, sampler: Sampler) -> None:
        self.limits = limits
        self.sampler = sampler
        self.slab = Slab(limits.capacity_pages)
        self.clients: dict[str, ClientPages] = {}
        self.counters = HostCounters()
        self.instance = secrets.token_hex(8)
        self.pressure = False

    # -- clients --------------------------------------------------------------

    def attach(self, name: str, device_size: int, session: str) -> ClientPages:
        """Register a pager connection.  Same name and session: a reconnect, pages kept.
        Same name, new session: the old instance's pages are dropped."""
        if device_size <= 0 or device_size % PAGE_SIZE:
            raise RequestError(f"device size {device_size} is not a positive multiple of {PAGE_SIZE}")
        npages = device_size // PAGE_SIZE
        client = self.clients.get(name)
        if client is not None and client.session == session and client.npages == npages:
            client.connected += 1
            return client
        if client is not None:
            if client.connected:
                raise RequestError(f"client name {name!r} is in use by another connection")
            self.counters.dropped_sessions += client.count
            self._drop_all(client)
        client = ClientPages(name, npages, session)
        client.connected = 1
        self.clients[name] = client
        return client

    def detach(self, client: ClientPages) -> None:
        client.connected -= 1

    def _drop_all(self, client: ClientPages) -> None:
        for slot in client.slots:
            if slot >= 0:
                self.slab.release(slot)
        client.count = 0
        client.slots = array("q", [-1]) * client.npages

    # -- pages ----------------------------------------------------------------

    def put(self, client: ClientPages, first: int, seq: int, data: bytes) -> bytes:
        """Offer ``len(data) // PAGE_SIZE`` pages starting at ``first``; one status per page."""
        if len(data) % PAGE_SIZE:
            raise RequestError(f"put data of {len(data)} bytes is not whole pages")
        n = len(data) // PAGE_SIZE
        self._check_range(client, first, n)
        c = self.counters
        c.put_requests += 1
        self.pressure = under_pressure(self.sampler.get(), self.limits, self.pressure)
        out = bytearray(n)
        view = memoryview(data)
        slots, seqs, slab = client.slots, client.seqs, self.slab
        for i in range(n):
            page = first + i
            if seq <= seqs[page]:
                out[i] = PageStatus.REFUSED_OUTDATED
                c.refused_outdated += 1
                continue
            seqs[page] = seq
            slot = slots[page]
            status = admit(self.limits, self.pressure, slab.used, client.count, slot >= 0)
            if status == PageStatus.STORED:
                if slot < 0:
                    slot = slab.alloc()
                    slots[page] = slot
                    client.count += 1
                else:
                    c.replaced += 1
                slab.write(slot, view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
                c.accepted += 1
            else:
                out[i] = status
                setattr(c, _REFUSAL_COUNTER[status], getattr(c, _REFUSAL_COUNTER[status]) + 1)
                if slot >= 0:  # never stale: the old version must not survive a refused new one
                    self._drop(client, page)
                    c.stale_dropped += 1
        return bytes(out)

    def get(self, client: ClientPages, pages: list[int]) -> tuple[bytes, bytes]:
        """Statuses (STORED or MISSING) and the pages' data, zeros where missing."""
        if not isinstance(pages, list) or not all(isinstance(p, int) for p in pages):
            raise RequestError("get takes a list of page numbers")
        if pages and (min(pages) < 0 or max(pages) >= client.npages):
            raise RequestError(f"get asks for pages outside the device's {client.npages} pages")
        self.counters.get_requests += 1
        status = bytearray(len(pages))
        data = bytearray(len(pages) * PAGE_SIZE)
        slots = client.slots
        for i, page in enumerate(pages):
            slot = slots[page]
            if slot < 0:
                status[i] = PageStatus.MISSING
                self.counters.misses += 1
                continue
            data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = self.slab.read(slot)
            self.counters.reads += 1
        return bytes(status), bytes(data)

    def invalidate(self, client: ClientPages, first: int, count: int, seq: int) -> int:
        """Drop pages whose stored version is not newer than ``seq``; returns pages dropped."""
        self._check_range(client, first, count)
        self.counters.invalidate_requests += 1
        dropped = 0
        slots, seqs = client.slots, client.seqs
        for page in range(first, first + count):
            if seqs[page] > seq:
                continue
            seqs[page] = seq
            if slots[page] >= 0:
                self._drop(client, page)
                dropped += 1
        self.counters.invalidated += dropped
        return dropped

    def _drop(self, client: ClientPages, page: int) -> None:
        self.slab.release(client.slots[page])
        client.slots[page] = -1
        client.count -= 1

    @staticmethod
    def _check_range(client: ClientPages, first: int, count: int) -> None:
        if not (isinstance(first, int) and isinstance(count, int)):
            raise RequestError("page numbers must be integers")
        if first < 0 or count < 0 or first + count > client.npages:
            raise RequestError(
                f"pages {first}..{first + count} outside the device's {client.npages} pages"
            )

    # -- counters ---------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        snap = self.sampler.get()
        stats: dict[str, object] = {
            "pages_stored": self.slab.used,
            "bytes_stored": self.slab.used * PAGE_SIZE,
            "slab_bytes_mapped": self.slab.mapped_bytes,
            "capacity_pages": self.limits.capacity_pages,
            "quota_pages": self.limits.quota_pages,
            "under_pressure": self.pressure,
            "used_percent": snap.used_percent,
            "high_percent": self.limits.high_percent,
            "low_percent": self.limits.low_percent,
            "pressure_samples": self.sampler.samples,
            "clients": {
                c.name: {"pages": c.count, "device_pages": c.npages, "connected": c.connected}
                for c in self.clients.values()
            },
        }
        stats.update(asdict(self.counters))
        return stats

    def close(self) -> None:
        self.slab.close()
