"""``vswapctl bench``'s report: medians and ratios from the samples, the table, the chart.

Pure: nothing here touches the machine (the chart writes the one file it is
given).  matplotlib is an optional extra (``pip install 'vswapfs[chart]'``),
imported only to draw; :func:`chart_path` checks for it when the arguments
are read, before anything runs.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

PHASES = ("fill", "verify_seq", "verify_random")
PHASE_LABELS = {"fill": "fill (swap-out)", "verify_seq": "sequential verify (swap-in)",
                "verify_random": "random verify (swap-in)"}
BASELINES = ("zram", "inproc", "hoststore")  # ratios are taken to these, when they ran
COUNTERS = ("pages_to_store", "pages_to_backing")  # vswapfs targets: where the pages went, per run
# Bytes of page data held per byte of memory, when the target held the most (zram and the stores)
MEMORY = "data_per_mem"
CPU = "cpu"  # per phase, CPU seconds by process: the workload and the target's daemons (vswapctl.cpuwatch)
CHART_FORMATS = ("png", "svg", "pdf")
CHART_EXTRA = "pip install 'vswapfs[chart]'"

Sample = Mapping[str, Any]  # one run of one target: seconds per phase, and what the target reported


def medians(samples: Mapping[str, Sequence[Sample]]) -> dict[str, dict[str, Any]]:
    """Per target that has samples: the median seconds of each phase, the number of runs,
    and the median of each counter every run reported."""
    out: dict[str, dict[str, Any]] = {}
    for target, runs in samples.items():
        if not runs:
            continue
        entry: dict[str, Any] = {phase: statistics.median(float(r[phase]) for r in runs) for phase in PHASES}
        entry["runs"] = len(runs)
        for counter in COUNTERS:
            if all(isinstance(r.get(counter), int) for r in runs):
                entry[counter] = int(statistics.median(r[counter] for r in runs))
        if all(isinstance(r.get(MEMORY), int | float) for r in runs):
            entry[MEMORY] = statistics.median(float(r[MEMORY]) for r in runs)
        if all(isinstance(r.get(CPU), Mapping) for r in runs):
            entry[CPU] = _cpu_medians([r[CPU] for r in runs])
        out[target] = entry
    return out


def _cpu_medians(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per phase and process, the median CPU seconds over the runs that measured it."""
    out: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        names = list(dict.fromkeys(name for r in runs for name in r.get(phase, {})))
        out[phase] = {name: round(statistics.median(float(r[phase][name]) for r in runs if name in r.get(phase, {})),
                                  3) for name in names}
    return out


def ratios(meds: Mapping[str, Mapping[str, Any]],
           baselines: Sequence[str] = BASELINES) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{"vs_<baseline>": {target: {phase: target's median / baseline's median}}}`` for each
    baseline that ran (lower is better; the baseline itself is 1.0).  None where the
    baseline's median is 0 (too fast to measure)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for base in baselines:
        if base not in meds:
            continue
        out[f"vs_{base}"] = {
            target: {phase: (round(m[phase] / meds[base][phase], 3) if meds[base][phase] > 0 else None)
                     for phase in PHASES}
            for target, m in meds.items()
        }
    return out


def build(samples: Mapping[str, Sequence[Sample]], params: Mapping[str, Any],
          skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The whole report (what ``--json`` prints)."""
    meds = medians(samples)
    return {
        "params": dict(params),
        "skipped": dict(skipped or {}),
        "medians": meds,
        "ratios": ratios(meds),
        "runs": {target: [dict(r) for r in runs] for target, runs in samples.items() if runs},
    }


# -- the table ------------------------------------------------------------------------


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g}M"


def describe(params: Mapping[str, Any]) -> str:
    """One line: what was measured."""
    parts = [f"{_mib(params['size'])} of {params.get('data', '?')} data in a {_mib(params['limit'])} memory cgroup"]
    if "device_size" in params:
        parts.append(f"{_mib(params['device_size'])} devices")
    if "small_capacity" in params:
        parts.append(f"hoststore-small holds {_mib(params['small_capacity'])}")
    if params.get("workload_cpu") is not None:
        parts.append(f"the workload kept on CPU {params['workload_cpu']}")
    return ", ".join(parts)


def format_table(report: Mapping[str, Any]) -> str:
    meds: Mapping[str, Mapping[str, Any]] = report["medians"]
    params = report.get("params", {})
    lines = []
    if params:
        runs = max((m["runs"] for m in meds.values()), default=0)
        lines.append(f"median seconds over {runs} interleaved runs ({describe(params)}); lower is better")
    header = ["target", *PHASES]
    if meds:
        lines += _grid([header] + [[t, *(f"{m[p]:.3f}" for p in PHASES)] for t, m in meds.items()])
    else:
        lines.append("no target ran")
    for target, reason in report.get("skipped", {}).items():
        lines.append(f"skipped {target}: {reason}")
    for target, m in meds.items():
        if all(c in m for c in COUNTERS):
            lines.append(f"{target}: {m['pages_to_store']} pages to the store, {m['pages_to_backing']} to the "
                         "backing file (median per run)")
    lines += memory_lines(meds)
    lines += cpu_lines(meds, params.get("cores"))
    for key, table in report.get("ratios", {}).items():
        base = key.removeprefix("vs_")
        lines += ["", f"ratio to {base} (median / {base}'s median; lower is better, 1.00 = as fast as {base})"]
        lines += _grid([header] + [[t, *("-" if r[p] is None else f"{r[p]:.2f}x" for p in PHASES)]
                                   for t, r in table.items()])
    return "\n".join(lines)


def memory_lines(meds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Bytes of pages held per byte of memory, each target that reports it, and the ratio to zram's."""
    held = {t: m[MEMORY] for t, m in meds.items() if MEMORY in m}
    if not held:
        return []
    base = held.get("zram")
    rows = [["target", "bytes per byte", "vs zram"]]
    rows += [[t, f"{v:.2f}", "-" if not base else f"{v / base:.2f}x"] for t, v in held.items()]
    return ["", "memory: bytes of pages held per byte of memory at the fullest (median; higher is better)",
            *_grid(rows)]


def cpu_lines(meds: Mapping[str, Mapping[str, Any]], cores: int | None) -> list[str]:
    """Each phase's CPU seconds by process, their sum, and how many cores that kept busy."""
    measured = {t: m[CPU] for t, m in meds.items() if CPU in m}
    if not measured:
        return []
    names = list(dict.fromkeys(n for cpu in measured.values() for phase in PHASES for n in cpu.get(phase, {})))
    rows = [["target", "phase", *names, "sum", "cores busy"]]
    for target, cpu in measured.items():
        for phase in PHASES:
            got = cpu.get(phase, {})
            total = sum(got.values())
            seconds = meds[target][phase]
            busy = f"{total / seconds:.2f}" if seconds > 0 else "-"
            rows.append([target, phase, *(f"{got[n]:.3f}" if n in got else "-" for n in names), f"{total:.3f}",
                         busy])
    where = f" (this machine has {cores})" if cores else ""
    return ["", "CPU seconds per phase (median): the workload's own (its code, and the kernel's reclaim done in "
                "its name; not with redis data, whose redis-server is not watched) and each daemon's serving "
                f"the target; cores busy = their sum / the phase's median seconds{where}: a lower bound, kswapd "
                "and the loop device's workers not counted", *_grid(rows)]


# -- the chart ------------------------------------------------------------------------


def matplotlib_missing() -> str | None:
    """Why a chart cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"--chart needs matplotlib, an optional extra: {CHART_EXTRA}"
    return None


def chart_path(text: str) -> str:
    """``--chart FILE``: checked when the arguments are read (matplotlib there, a known
    format, a directory to write to), not after the runs."""
    problem = matplotlib_missing()
    if problem:
        raise ValueError(problem)
    ext = os.path.splitext(text)[1].lower().lstrip(".")
    if ext not in CHART_FORMATS:
        raise ValueError(f"{text}: the chart's format comes from its name: end it in "
                         f"{', '.join('.' + f for f in CHART_FORMATS)}")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ValueError(f"{text}: cannot write in {directory}")
    return text


def write_chart(report: Mapping[str, Any], path: str) -> None:
    """Grouped bars: a group per phase, a bar per target (median seconds), whiskers from
    the fastest to the slowest run, the ratio to the first baseline that ran on top."""
    # no pyplot: no global state, no display needed
    from matplotlib.figure import Figure

    meds: Mapping[str, Mapping[str, Any]] = report["medians"]
    runs: Mapping[str, Sequence[Sample]] = report.get("runs", {})
    targets = list(meds)
    ratio_key = next(iter(report.get("ratios", {})), None)
    held = {t: m[MEMORY] for t, m in meds.items() if MEMORY in m}
    fig = Figure(figsize=(max(7.0, 0.6 * len(targets) * len(PHASES)) + (3.0 if held else 0.0), 4.8),
                 layout="constrained")
    if held:
        ax, mem = fig.subplots(1, 2, width_ratios=[3, 1])
        _memory_panel(mem, held, [f"C{targets.index(t)}" for t in held])
    else:
        ax = fig.add_subplot()
    width = 0.8 / max(len(targets), 1)
    for n, target in enumerate(targets):
        xs = [i - 0.4 + width * (n + 0.5) for i in range(len(PHASES))]
        heights = [meds[target][p] for p in PHASES]
        samples = runs.get(target) or []
        lows = [h - min((float(s[p]) for s in samples), default=h) for h, p in zip(heights, PHASES)]
        highs = [max((float(s[p]) for s in samples), default=h) - h for h, p in zip(heights, PHASES)]
        bars = ax.bar(xs, heights, width, label=target, yerr=[lows, highs], capsize=3)
        if ratio_key:
            ratio = report["ratios"][ratio_key].get(target, {})
            ax.bar_label(bars, labels=["" if ratio.get(p) is None else f"{ratio[p]:.2f}x" for p in PHASES],
                         fontsize=7, padding=2)
    ax.set_xticks(range(len(PHASES)), [PHASE_LABELS[p] for p in PHASES])
    ax.set_ylabel("median seconds (lower is better)")
    title = "vswapctl bench"
    if report.get("params"):
        title += f": {describe(report['params'])}"
    if ratio_key:
        title += f"\nlabels: ratio to {ratio_key.removeprefix('vs_')}; whiskers: fastest to slowest run"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path)


def _memory_panel(ax: Any, held: Mapping[str, float], colors: list[str]) -> None:
    """Bytes of pages held per byte of memory, a bar per target that reports it (in its colour)."""
    bars = ax.bar(range(len(held)), list(held.values()), color=colors)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in held.values()], fontsize=7, padding=2)
    ax.set_xticks(range(len(held)), list(held), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("bytes of pages per byte of memory (higher is better)")
    ax.set_title("memory at the fullest (median)", fontsize=9)
