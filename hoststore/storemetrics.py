"""hoststore's stats as Prometheus metric families (the glue: ``vswapcommon.metrics``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vswapcommon.counters import index
from vswapcommon.metrics import counter_families

from .hostcounters import HostCounter
from .tiercounters import TierCounter

KNOWN = index(HostCounter, TierCounter)


def store_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """hoststore's ``stats`` (admin view) as metric families."""
    yield from counter_families("vswap_store", {k: v for k, v in stats.items() if k not in _STORE_GAUGES}, KNOWN)
    for key, (name, help_text, scale) in _STORE_GAUGES.items():
        value = stats.get(key)
        if isinstance(value, int | float):  # bools too: 1 or 0
            yield GaugeMetricFamily(name, help_text, value=float(value) * scale)
    yield from compression_families(stats, clients=stats.get("clients") or {})
    tier = stats.get("tier")
    if isinstance(tier, dict):  # a store on a page tier (hoststore --tier): its counters by cause
        yield from counter_families("vswap_store", {k: v for k, v in tier.items() if k.startswith("tier_")}, KNOWN)
    clients = stats.get("clients") or {}
    pages = GaugeMetricFamily("vswap_store_client_pages", "Pages a client holds in the store", labels=["client"])
    for name, client in sorted(clients.items()):
        pages.add_metric([name], client.get("pages", 0))
    yield pages
    for name, client in sorted(clients.items()):
        counters = {k: v for k, v in client.items() if k in stats and k not in _STORE_GAUGES}
        yield from counter_families("vswap_store_client", counters, KNOWN, {"client": name})


# What compression saves (``stats["compression"]``; per client the same fields but the times).
COMPRESSION_GAUGES = {
    "orig_data_bytes": "Bytes of the pages held compressed, as pages",
    "compr_data_bytes": "Their compressed bytes",
    "mem_used_bytes": "Memory the size classes hold for them (what the kernel holds for the memory file)",
    "charged_bytes": "What they cost against --capacity and quotas: the bytes of their size classes",
    "incompressible_pages": "Pages held as they are, not shrinking below 3 KiB",
}
COMPRESSION_TIMES = {
    "compress_seconds": "Time spent compressing pages (all threads together)",
    "decompress_seconds": "Time the store spent decompressing pages for get answers",
}


def compression_families(stats: dict[str, Any], clients: dict[str, Any]) -> Iterator[Metric]:
    comp = stats.get("compression")
    if not isinstance(comp, dict):
        return
    for key, help_text in COMPRESSION_GAUGES.items():
        yield GaugeMetricFamily(f"vswap_store_{key}", help_text, value=comp.get(key, 0))
        family = GaugeMetricFamily(f"vswap_store_client_{key}", f"{help_text}, of one client", labels=["client"])
        for name, client in sorted(clients.items()):
            if key in client:
                family.add_metric([name], client[key])
        yield family
    for key, help_text in COMPRESSION_TIMES.items():
        yield CounterMetricFamily(f"vswap_store_{key}", help_text, value=comp.get(key, 0.0))


_STORE_GAUGES = {
    "bytes_stored": ("vswap_store_stored_bytes", "Bytes of pages the store holds", 1),
    "pages_stored": ("vswap_store_stored_pages", "Pages the store holds", 1),
    "ephemeral_pages": ("vswap_store_ephemeral_pages", "Of those, pages of ephemeral pools", 1),
    "capacity_pages": ("vswap_store_capacity_bytes", "The store's capacity", 4096),
    "slab_bytes_mapped": ("vswap_store_slab_bytes", "Memory mapped for page data", 1),
    "used_percent": ("vswap_host_memory_used_ratio", "Used memory of the host (what the watermarks compare)",
                     0.01),
    "connections_active": ("vswap_store_connections", "Connections open now", 1),
    "under_pressure": ("vswap_store_under_pressure", "1 while the store refuses for memory pressure", 1),
    "pressure_samples": ("vswap_store_pressure_samples", "Memory pressure samples taken", 1),
    "pid": ("vswap_store_pid", "The store's process id", 1),
}
