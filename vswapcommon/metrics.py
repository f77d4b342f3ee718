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
from collections.abc import Iterator, Mapping
from typing import Any

import trio
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, Metric

from .counters import CounterEnum, Unit

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


def _unit(counter: CounterEnum | None) -> str:
    """The unit a counter's metric name ends with: pages and connections are named, requests
    and events are plain counts.  A counter defined nowhere counts pages."""
    unit = Unit.PAGES if counter is None else counter.unit
    return unit.value if unit in (Unit.PAGES, Unit.CONNECTIONS) else ""


def counter_families(prefix: str, counters: dict[str, Any], known: Mapping[str, CounterEnum],
                     labels: dict[str, str] | None = None) -> Iterator[Metric]:
    """A daemon's counters (name -> int), as ``known`` defines them (``counters.index``):
    refusals by reason in one family, the rest each in its own, named with its unit."""
    label_names = list(labels or {})
    label_values = list((labels or {}).values())
    refused = CounterMetricFamily(f"{prefix}_refused_pages", "Pages refused, by reason",
                                  labels=[*label_names, "reason"])
    any_refused = False
    for name, value in sorted(counters.items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        counter = known.get(name)
        reason = None if counter is None else counter.reason
        if reason is not None:
            refused.add_metric([*label_values, reason], value)
            any_refused = True
            continue
        unit = _unit(counter)
        metric = name if not unit or name.endswith(unit) else f"{name}_{unit}"
        family = CounterMetricFamily(f"{prefix}_{metric}", counter.description if counter else name.replace("_", " "),
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
