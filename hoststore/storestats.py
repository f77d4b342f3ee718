"""What the store reports (``vswapctl stats``, the metrics): its counters and state,
each client's, and what compression saves."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from pagewire.messages import PAGE_SIZE
from vswapcommon.logsetup import OUTPUT

from . import ephemeral
from .clientpages import ClientPages

Store = Any  # a hoststore.store.Store (which imports this module: named, not imported)


def store_stats(store: Store, client: ClientPages | None = None, admin: bool = False) -> dict[str, object]:
    """The store's counters; per-client detail for an admin, or only the asking client's own."""
    snap = store.sampler.get()
    stats: dict[str, object] = {
        "instance": store.instance,
        "pid": os.getpid(),
        "pages_stored": store.pages,
        "ephemeral_pages": ephemeral.pages(store),
        "bytes_stored": store.pages * PAGE_SIZE,
        "slab_bytes_mapped": sum(c.slab.mapped_bytes for c in store.clients.values()),
        "capacity_pages": store.limits.capacity_pages,
        "quota_pages": store.limits.quota_pages,
        "under_pressure": store.pressure,
        "policy": store.policy.spec,
        "draining": store.draining,
        "used_percent": snap.used_percent,
        "high_percent": store.limits.high_percent,
        "low_percent": store.limits.low_percent,
        "pressure_samples": store.sampler.samples,
        "connections_active": store.connections_active,
        "pressure_risks": store.pressure_risks,
        "log_lines_dropped": OUTPUT.dropped,
        "fullest": store.fullest.as_dict(),
    }
    stats.update(store.counters.as_dict())
    if store.compressor.codec is not None:
        stats["compression"] = {"algorithm": store.compressor.codec.name.lower(),
                                **compression_stats(list(store.clients.values())),
                                "compress_seconds": store.compressor.compress_ns / 1e9,
                                "decompress_seconds": store.compressor.decompress_ns / 1e9}
    backend = store.backend.stats()
    if backend is not None:
        stats["tier"] = backend
    if admin:
        stats["clients"] = {c.name: client_stats(store, c) for c in store.clients.values()}
    elif client is not None:
        stats["clients"] = {client.name: client_stats(store, client)}
    return stats


def client_stats(store: Store, client: ClientPages) -> dict[str, object]:
    terms = store.terms(client)
    stats: dict[str, object] = {
        "pool": client.pool,
        "pages": client.count,
        "quota_pages": terms.quota_pages,
        "weight": store.limits.weight_of(client.name),
        "share_pages": terms.share_pages,
        "device_pages": client.npages,
        "connected": client.connected,
        "away_seconds": None if (away := store.registry.away_seconds(client)) is None else round(away, 1),
        "lent": client.lent_count,
        "slab_bytes_mapped": client.slab.mapped_bytes,
        "index_bytes": client.index.nbytes,
        "shared_memory": client.shared is not None,
    }
    if client.zslab is not None:
        stats.update(compression_stats([client]))
    stats.update(store.client_counters[client.name].as_dict())
    return stats


SAMPLE_INTERVAL = 0.02  # seconds between two looks at the memory the pages take


class Fullest:
    """The memory the page data took when the store held the most, noted after each put
    and after each batch the compressor finishes (so once it has caught up with the
    pages, as zram's figure is, zram compressing as it stores), and the most it ever took
    (as zram's mem_used_max): what a benchmark compares, since by the time it asks its
    pages are gone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.data_bytes = 0
        self.mem_bytes = 0
        self.mem_max = 0
        self.clock = clock
        self._last = -SAMPLE_INTERVAL

    def note(self, data_bytes: int, clients: Iterable[ClientPages], every: bool = False) -> None:
        """After a put at most once per ``SAMPLE_INTERVAL``, as the bench samples zram (the
        memory is a walk over every client, which a put must not pay each time); after
        each of the compressor's batches (``every``), so that the state once it has caught
        up is never skipped."""
        now = self.clock()
        if not every and now - self._last < SAMPLE_INTERVAL:
            return
        self._last = now
        mem = sum(c.slab.mapped_bytes for c in clients)
        self.mem_max = max(self.mem_max, mem)
        if data_bytes >= self.data_bytes:
            self.data_bytes, self.mem_bytes = data_bytes, mem

    def as_dict(self) -> dict[str, int]:
        return {"data_bytes": self.data_bytes, "mem_bytes": self.mem_bytes, "mem_used_max_bytes": self.mem_max}


def compression_stats(clients: list[ClientPages]) -> dict[str, object]:
    """What compression saves, as zram's mm_stat says it: data bytes, their compressed
    bytes, the memory the size classes hold, and the pages kept as they are."""
    zslabs = [z for c in clients if (z := c.zslab) is not None]
    orig = sum(z.used for z in zslabs) * PAGE_SIZE
    mem = sum(z.mapped_bytes for z in zslabs)
    return {"orig_data_bytes": orig, "compr_data_bytes": sum(z.compr_bytes for z in zslabs),
            "mem_used_bytes": mem, "charged_bytes": sum(z.charged_bytes for z in zslabs),
            "incompressible_pages": sum(z.incompressible for z in zslabs),
            "pending_pages": sum(z.pending for z in zslabs),
            "ratio": round(orig / mem, 3) if mem else None}
