"""The figures of a controller's run, from its record (``--record``'s JSON lines).

One column per run, so that runs can be printed side by side (vswapfs and zram,
with and without the controller): memory saved against the cgroup's peak, the
workload's own figure, stall (PSI), swap-ins per minute against the working
set (Google's SLO), where the device's pages live and what the host did.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def load(path: str) -> list[dict[str, Any]]:
    """The lines of the last run in a record (``--record`` appends: a file may hold
    several); a line cut short (the controller killed mid-write) is skipped."""
    lines = []
    with open(path) as f:
        for text in f:
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
    starts = [i for i, x in enumerate(lines) if x.get("kind") == "start"]
    return lines[starts[-1]:] if starts else lines


def summarize(lines: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any]:
    """The run's figures; ``metric``: the workload's figure to average (its first
    numeric one if None).  Figures over the second half of the run are the
    settled ones: the controller spends the first half finding the working set."""
    start = next((x for x in lines if x.get("kind") == "start"), {})
    ticks = [x for x in lines if x.get("kind") == "tick"]
    if not ticks:
        raise ValueError("the record has no ticks")
    peak = max([start.get("peak", 0)] + [x["peak"] for x in ticks])
    settled = ticks[len(ticks) // 2:]
    seconds = max(ticks[-1]["t"] - ticks[0]["t"], 1e-9)
    settled_usage = statistics.mean(x["usage"] for x in settled)
    out: dict[str, Any] = {
        "controller": start.get("controller"), "seconds": round(seconds, 1),
        "peak_bytes": peak, "end_bytes": ticks[-1]["usage"], "settled_bytes": int(settled_usage),
        "saved_end": 1 - ticks[-1]["usage"] / peak if peak else 0.0,
        "saved_settled": 1 - settled_usage / peak if peak else 0.0,
        "psi_some": sum(x["some_us"] for x in ticks[1:]) / 1e6 / seconds,
        "psi_full": sum(x["full_us"] for x in ticks[1:]) / 1e6 / seconds,
        "oom_kills": ticks[-1]["oom_kills"] - ticks[0]["oom_kills"],
        "pressure_scope": (start.get("signals") or {}).get("pressure", ""),
    }
    ins = [x for x in settled if "swapins" in x]
    if ins:
        minutes = max((ins[-1]["t"] - ins[0]["t"]) / 60, 1e-9)
        per_minute = sum(x["swapins"] for x in ins[1:]) / minutes
        out["swapins_per_min"] = per_minute
        out["promotion_rate"] = per_minute / max(settled_usage / PAGE, 1)
    work = [_metric(x.get("workload"), metric) for x in settled]
    work = [w for w in work if w is not None]
    if work:
        out["workload_metric"] = metric or _first_numeric(next(x["workload"] for x in settled if x.get("workload")))
        out["workload"] = statistics.median(work)
    device = ticks[-1].get("device")
    if device:
        out["device"] = {k: device[k] for k in ("store_pages", "backing_pages", "store_ratio", "refused")
                         if k in device}
    return out


def _first_numeric(d: dict[str, Any]) -> str | None:
    return next((k for k, v in d.items() if isinstance(v, (int, float)) and k != "t"), None)


def _metric(d: dict[str, Any] | None, name: str | None) -> float | None:
    if not d:
        return None
    name = name or _first_numeric(d)
    value = d.get(name) if name else None
    return float(value) if isinstance(value, (int, float)) else None


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


ROWS: tuple[tuple[str, str], ...] = (
    ("controller", "controller"),
    ("seconds", "run (s)"),
    ("peak_bytes", "cgroup peak"),
    ("settled_bytes", "resident, settled (2nd half mean)"),
    ("saved_settled", "memory saved, settled (% of peak)"),
    ("saved_end", "memory saved at the end (% of peak)"),
    ("workload", "workload figure (median, settled)"),
    ("psi_some", "PSI memory some (% of time)"),
    ("psi_full", "PSI memory full (% of time)"),
    ("promotion_rate", "swap-ins per min / working set"),
    ("oom_kills", "OOM kills"),
    ("store_pages", "device pages in the store (end)"),
    ("backing_pages", "device pages in the backing file (end)"),
    ("store_ratio", "store: bytes of pages per byte of memory"),
    ("refused", "store refusals (pages)"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return _mib(value)
    if key.startswith("saved") or key.startswith("psi") or key == "promotion_rate":
        return f"{value:.2%}"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 1000 else f"{value:.0f}"
    return str(value)


def table(runs: Iterable[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    runs = list(runs)
    rows = [["", *[name for name, _ in runs]]]
    for key, label in ROWS:
        cells = [_cell(key, s.get(key, (s.get("device") or {}).get(key))) for _, s in runs]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def chart(runs: list[tuple[str, list[dict[str, Any]]]], path: str, metric: str | None = None) -> None:
    """Resident memory and limit, stall and the workload's figure over time, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name, lines in runs:
        ticks = [x for x in lines if x.get("kind") == "tick"]
        t = [x["t"] for x in ticks]
        peak = max(x["peak"] for x in ticks)
        line, = axes[0].plot(t, [x["usage"] / (1 << 20) for x in ticks], label=f"{name}: resident")
        # A limit far above the peak (the one found: often none) would flatten the rest.
        limits = [x["limit"] / (1 << 20) if x["limit"] and x["limit"] <= 1.5 * peak else float("nan") for x in ticks]
        axes[0].plot(t, limits, linestyle=":", color=line.get_color(), label=f"{name}: limit")
        axes[1].plot(t, [x["some_us"] / 1000 for x in ticks], label=name)
        axes[2].plot(t, [_metric(x.get("workload"), metric) or float("nan") for x in ticks], label=name)
    axes[0].set_ylabel("MiB")
    axes[1].set_ylabel("memory stall, ms per s")
    axes[2].set_ylabel(metric or "workload figure")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
