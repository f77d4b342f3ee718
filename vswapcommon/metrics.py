"""Prometheus metrics for both daemons (``--metrics [HOST:]PORT``), with prometheus-client.

The daemon's trio loop publishes a snapshot of its counters (``publish``) once
a second; the HTTP server runs in prometheus-client's own thread and reads
only that snapshot, so a scrape never touches the live structures and never
waits for the loop.

Names follow Prometheus conventions: ``vswap_<daemon>_<what>_<unit>_total``
for counters, gauges in base units (bytes, ratios), and a label where one
family has several causes (``reason`` for refusals, ``state`` for where pages
live, ``client`` for a store's clients).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric

from .counters import Unit, description_of, reason_of, unit_of

DEFAULT_HOST = "127.0.0.1"
PUBLISH_INTERVAL = 1.0

def parse_metrics_address(text: str) -> tuple[str, int]:
    """``PORT`` (on loopback) or ``HOST:PORT``; ValueError names the problem."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics address {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"metrics address {text!r}: port {port} out of range")
    return host or DEFAULT_HOST, port


def _unit(name: str) -> str:
    """The unit a counter's metric name ends with: pages and connections are named, requests
    and events are plain counts.  A counter defined nowhere counts pages."""
    unit = unit_of(name) or Unit.PAGES
    return unit.value if unit in (Unit.PAGES, Unit.CONNECTIONS) else ""


def counter_families(prefix: str, counters: dict[str, Any], labels: dict[str, str] | None = None
                     ) -> Iterator[Metric]:
    """A daemon's counters (name -> int): refusals by reason in one family, the rest each
    in its own, named with its unit."""
    label_names = list(labels or {})
    label_values = list((labels or {}).values())
    refused = CounterMetricFamily(f"{prefix}_refused_pages", "Pages refused, by reason",
                                  labels=[*label_names, "reason"])
    any_refused = False
    for name, value in sorted(counters.items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        reason = reason_of(name)
        if reason is not None:
            refused.add_metric([*label_values, reason], value)
            any_refused = True
            continue
        unit = _unit(name)
        metric = name if not unit or name.endswith(unit) else f"{name}_{unit}"
        family = CounterMetricFamily(f"{prefix}_{metric}", description_of(name) or name.replace("_", " "),
                                     labels=label_names)
        family.add_metric(label_values, value)
        yield family
    if any_refused:
        yield refused


class Snapshot:
    """The last published counters, read by the HTTP thread."""

    def __init__(self, describe: Any) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self._describe = describe  # stats -> metric families

    def publish(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self._stats = stats

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            stats = self._stats
        if stats:
            yield from self._describe(stats)


def store_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """hoststore's ``stats`` (admin view) as metric families."""
    yield from counter_families("vswap_store", {k: v for k, v in stats.items() if k not in _STORE_GAUGES})
    for key, (name, help_text, scale) in _STORE_GAUGES.items():
        value = stats.get(key)
        if isinstance(value, int | float):  # bools too: 1 or 0
            yield GaugeMetricFamily(name, help_text, value=float(value) * scale)
    tier = stats.get("tier")
    if isinstance(tier, dict):  # a store on a page tier (hoststore --tier): its counters by cause
        yield from counter_families("vswap_store", {k: v for k, v in tier.items() if k.startswith("tier_")})
    clients = stats.get("clients") or {}
    pages = GaugeMetricFamily("vswap_store_client_pages", "Pages a client holds in the store", labels=["client"])
    for name, client in sorted(clients.items()):
        pages.add_metric([name], client.get("pages", 0))
    yield pages
    for name, client in sorted(clients.items()):
        counters = {k: v for k, v in client.items() if k in stats and k not in _STORE_GAUGES}
        yield from counter_families("vswap_store_client", counters, {"client": name})


_STORE_GAUGES = {
    "bytes_stored": ("vswap_store_stored_bytes", "Bytes of pages the store holds", 1),
    "pages_stored": ("vswap_store_stored_pages", "Pages the store holds", 1),
    "capacity_pages": ("vswap_store_capacity_bytes", "The store's capacity", 4096),
    "slab_bytes_mapped": ("vswap_store_slab_bytes", "Memory mapped for page data", 1),
    "used_percent": ("vswap_host_memory_used_ratio", "Used memory of the host (what the watermarks compare)",
                     0.01),
    "connections_active": ("vswap_store_connections", "Connections open now", 1),
    "under_pressure": ("vswap_store_under_pressure", "1 while the store refuses for memory pressure", 1),
    "pressure_samples": ("vswap_store_pressure_samples", "Memory pressure samples taken", 1),
    "pid": ("vswap_store_pid", "The store's process id", 1),
}


def pager_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """vswapfs's stats as metric families."""
    pages = GaugeMetricFamily("vswap_pager_pages", "Device pages by where they live", labels=["state"])
    gauges = {"device_bytes": "vswap_pager_device_bytes", "orphans_pending": "vswap_pager_drops_pending",
              "swap_opens": "vswap_pager_swap_opens", "host_connected": "vswap_pager_store_connected",
              "shared_memory": "vswap_pager_shared_memory", "pid": "vswap_pager_pid"}
    counters = {}
    for key, value in stats.items():
        if key.startswith("pages_"):
            pages.add_metric([key.removeprefix("pages_")], value)
        elif key in gauges:
            yield GaugeMetricFamily(gauges[key], key.replace("_", " "), value=float(value))
        elif key != "device_pages" and not isinstance(value, bool):
            counters[key] = value
    yield pages
    yield from counter_families("vswap_pager", counters)


def start(address: tuple[str, int], describe: Any) -> Snapshot:
    """Serve ``describe(last published stats)`` at http://HOST:PORT/metrics from a thread."""
    snapshot = Snapshot(describe)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(snapshot)  # type: ignore[arg-type]
    start_http_server(address[1], addr=address[0], registry=registry)
    return snapshot


async def publish_forever(snapshot: Snapshot, stats: Any, interval: float = PUBLISH_INTERVAL) -> None:
    """In the daemon's trio loop: hand the HTTP thread a fresh copy now and then."""
    while True:
        try:
            snapshot.publish(stats())
        except Exception:  # noqa: BLE001 - metrics must never take a daemon down
            pass
        await trio.sleep(interval)
