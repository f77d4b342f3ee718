"""Looking rather than reading: samples of both daemons' counters for ``vswapctl top``
(a live view), ``record`` (to JSON lines or CSV) and ``plot`` (a chart of a recording).

A sample is one flat map: ``time``, then ``vswapfs.NAME`` and ``store.NAME`` for
every number either daemon reports (vswapfs from its control socket, the store
with a ``stats`` request; nothing touches the mount), and ``cache.NAME`` for an
FS-cache's section when one is up (from fscache's control socket).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

Sample = dict[str, float]

# What top shows as rates (per second), by the counter behind each.
RATES = (("writes", "vswapfs.write_requests"), ("pages out to store", "vswapfs.host_writes"),
         ("pages out to backing", "vswapfs.backing_writes"), ("pages in from store", "vswapfs.host_reads"),
         ("pages in from backing", "vswapfs.backing_reads"), ("discarded pages", "vswapfs.discard_pages"))
PAGES = ("host", "host_and_backing", "backing", "same_filled", "unwritten", "lost_now")
# The FS-cache's, when one is up.
CACHE_RATES = (("cache pages from store", "cache.host_hits"), ("cache pages from LOWER", "cache.lower_pages_read"),
               ("cache pages invalidated", "cache.invalidated_pages"))


def flatten(prefix: str, stats: dict[str, Any] | str | None) -> Sample:
    out: Sample = {}
    if not isinstance(stats, dict):
        return out
    for key, value in stats.items():
        if isinstance(value, bool):
            out[f"{prefix}.{key}"] = float(value)
        elif isinstance(value, int | float):
            out[f"{prefix}.{key}"] = float(value)
    return out


def take(read_vswapfs: Callable[[], Any], read_store: Callable[[], Any],
         read_cache: Callable[[], Any] | None = None) -> Sample:
    """One sample; with ``read_cache`` (an FS-cache is up), its ``cache`` section too
    (``cache.NAME``, and ``cache.dropped.CAUSE`` for the store's drops of its pages)."""
    sample: Sample = {"time": time.time()}
    sample.update(flatten("vswapfs", read_vswapfs()))
    sample.update(flatten("store", read_store()))
    if read_cache is not None:
        cache = read_cache()
        sample.update(flatten("cache", cache))
        sample.update(flatten("cache.dropped", cache.get("dropped_pages") if isinstance(cache, dict) else None))
    return sample


def rates(before: Sample, after: Sample) -> dict[str, float]:
    """Per-second rates of every counter between two samples (missing ones: 0)."""
    span = after["time"] - before["time"]
    if span <= 0:
        return {}
    return {key: (after[key] - before.get(key, after[key])) / span for key in after if key != "time"}


def refusal_rates(per_second: dict[str, float], side: str = "store") -> dict[str, float]:
    prefix = f"{side}.refused_"
    return {key.removeprefix(prefix): value for key, value in per_second.items()
            if key.startswith(prefix) and value > 0}


def render(sample: Sample, per_second: dict[str, float], title: str) -> str:
    """One screen of ``top``."""
    lines = [f"{title}   {time.strftime('%H:%M:%S', time.localtime(sample['time']))}", ""]
    if "vswapfs.device_pages" in sample:
        lines.append("pages      " + "  ".join(f"{name} {int(sample.get(f'vswapfs.pages_{name}', 0))}"
                                               for name in PAGES))
        lines.append(f"store      connected {'yes' if sample.get('vswapfs.host_connected') else 'NO'}, "
                     f"shared memory {'yes' if sample.get('vswapfs.shared_memory') else 'no'}")
    if "store.pages_stored" in sample:
        lines.append(f"host       {int(sample['store.pages_stored'])} pages stored of "
                     f"{int(sample.get('store.capacity_pages', 0))}; memory used "
                     f"{sample.get('store.used_percent', 0):.1f}%"
                     + ("  UNDER PRESSURE" if sample.get("store.under_pressure") else ""))
    if "cache.slots" in sample:
        dropped = "  ".join(f"{k.removeprefix('cache.dropped.')} {int(v)}" for k, v in sorted(sample.items())
                            if k.startswith("cache.dropped."))
        lines.append(f"cache      {int(sample.get('cache.host_pages', 0))} pages in the store, "
                     f"{int(sample.get('cache.cached_pages', 0))} named; dropped by the store: {dropped or '-'}")
    lines.append("")
    for label, key in RATES + CACHE_RATES:
        if key in sample:
            lines.append(f"{label:<24}{per_second.get(key, 0.0):>12.0f}/s")
    refusals = refusal_rates(per_second) or refusal_rates(per_second, "vswapfs")
    lines.append("refusals/s               " + ("  ".join(f"{k} {v:.0f}" for k, v in sorted(refusals.items()))
                                                 or "none"))
    return "\n".join(lines)


def write_sample(out: Any, sample: Sample, fmt: str, header: list[str] | None) -> list[str] | None:
    """Append one sample: a JSON line, or a CSV row (the header, from the first sample, once)."""
    if fmt == "json":
        out.write(json.dumps(sample, sort_keys=True) + "\n")
        return header
    if header is None:
        header = sorted(sample)
        csv.writer(out).writerow(header)
    csv.writer(out).writerow([sample.get(key, "") for key in header])
    return header


def read_recording(path: str) -> list[Sample]:
    with open(path) as f:
        if path.endswith(".csv"):
            return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]


def series(samples: list[Sample], key: str) -> Iterator[tuple[float, float]]:
    start = samples[0]["time"]
    for s in samples:
        if key in s:
            yield s["time"] - start, s[key]


def plot(samples: list[Sample], path: str) -> None:
    """Pages by where they live, and the rates of pages in and out, over time."""
    from matplotlib.figure import Figure

    if len(samples) < 2:
        raise ValueError("a plot needs at least two samples")
    fig = Figure(figsize=(10, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name in PAGES:
        points = list(series(samples, f"vswapfs.pages_{name}"))
        if points and any(v for _, v in points):
            top.plot([t for t, _ in points], [v for _, v in points], label=name)
    stored = list(series(samples, "store.pages_stored"))
    if stored:
        top.plot([t for t, _ in stored], [v for _, v in stored], label="stored (store)", linestyle="--")
    cached = list(series(samples, "cache.host_pages"))
    if cached:
        top.plot([t for t, _ in cached], [v for _, v in cached], label="cache's pages in the store", linestyle=":")
    top.set_ylabel("pages")
    top.legend(loc="upper left", fontsize="small")
    for label, key in RATES[1:] + CACHE_RATES:
        per = [(b["time"] - samples[0]["time"], rates(a, b).get(key, 0.0)) for a, b in zip(samples, samples[1:])]
        if any(v for _, v in per):
            bottom.plot([t for t, _ in per], [v for _, v in per], label=label)
    bottom.set_ylabel("pages per second")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
