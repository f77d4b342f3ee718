"""The cache's figures: its own counters, what the store says it holds and dropped of it, as metrics too."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client.core import GaugeMetricFamily, Metric

from pagewire.causes import DROP_CAUSES
from vswapcommon.counters import index
from vswapcommon.metrics import counter_families
from vswapfs.pagestore import StoreClient, StoreError, StoreUnavailable

from .counters import CacheCounter

log = logging.getLogger("fscache.stats")

KNOWN = index(CacheCounter)
FOLLOW_INTERVAL = 1.0
DROPPED = tuple(f"dropped_{c.name}" for c in DROP_CAUSES)


class StoreFigures:
    """What the store says of our pool, asked once a second (the store drops ephemeral pages
    without telling anyone: only it can say how many, and why)."""

    def __init__(self, client: StoreClient, interval: float = FOLLOW_INTERVAL) -> None:
        self.client = client
        self.interval = interval
        self.latest: dict[str, Any] = {"host_pages": None, "dropped_pages": None}

    async def follow(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.interval)

    async def refresh(self) -> None:
        try:
            with trio.fail_after(self.interval * 5):
                stats = await _ask(self.client)
        except (StoreUnavailable, StoreError, trio.TooSlowError) as exc:
            log.debug("no figures from the store: %s", exc)
            return
        mine = next(iter((stats.get("clients") or {}).values()), None)
        if not isinstance(mine, dict):
            return
        self.latest = {"host_pages": mine.get("pages"),
                       "dropped_pages": {name.removeprefix("dropped_"): mine.get(name, 0) for name in DROPPED}}


async def _ask(client: StoreClient) -> dict[str, Any]:
    """The store's stats as this client may see them (its own figures only): a store daemon's
    client asks it, the in-process store knows them at once."""
    answer = client.stats()  # type: ignore[attr-defined]
    if inspect.isawaitable(answer):
        answer = await answer
    return answer


def cache_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """fscache's stats as metric families (``vswap_cache_...``)."""
    section = stats.get("cache", {})
    gauges = {"cached_pages": "vswap_cache_cached_pages", "host_pages": "vswap_cache_host_pages",
              "slots": "vswap_cache_slots", "files_known": "vswap_cache_files_known"}
    counters = {}
    for key, value in section.items():
        if key in gauges:
            if value is not None:
                yield GaugeMetricFamily(gauges[key], key.replace("_", " "), value=float(value))
        elif key == "dropped_pages":
            family = GaugeMetricFamily("vswap_cache_dropped_pages", "Pages of the cache the store dropped, "
                                       "by cause (as the store last said)", labels=["cause"])
            for cause, n in (value or {}).items():
                family.add_metric([cause], float(n))
            yield family
        elif isinstance(value, int) and not isinstance(value, bool):
            counters[key] = value
    yield from counter_families("vswap_cache", counters, KNOWN)
    yield GaugeMetricFamily("vswap_cache_store_connected", "connected to the store",
                            value=float(bool(stats.get("host_connected"))))
