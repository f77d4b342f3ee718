"""vswapfs's stats as Prometheus metric families (the glue: ``vswapcommon.metrics``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from vswapcommon.counters import index
from vswapcommon.metrics import counter_families

from .linkcounters import LinkCounter
from .pagercounters import PagerCounter

KNOWN = index(PagerCounter, LinkCounter)


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
    yield from counter_families("vswap_pager", counters, KNOWN)
