"""``vswapctl offload``: push a memory cgroup into swap and find its working set (offload/)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any

from pagewire.address import INPROC
from vswapcommon.cliutil import argtype, positive
from vswapcommon.sizes import format_size, parse_size

from offload import report
from offload.cgroupfs import Cgroup, CgroupError, resolve
from offload.claim import Claim, Claimed
from offload.controller import (CONTROLLERS, DEFAULT_FLOOR, DEFAULT_PRESSURE_US, DEFAULT_SLO, SENPAI, Controller,
                                Settings, StopRequested)
from offload.law import Tuning

from ..state import State
from .common import StoreTarget, fail, read_host_stats, read_vswapfs_stats, say

VMSTAT = "/proc/vmstat"


def device_reader(state: State) -> Any:
    """The device's figures for a tick: pages swapped in (every read of the swap
    file), where its pages live, and what the store refused and how it packs them."""
    def read() -> dict[str, Any] | None:
        fs = read_vswapfs_stats(state)
        if isinstance(fs, str):
            return None
        out: dict[str, Any] = {
            "swapins": sum(fs.get(k, 0) for k in ("host_reads", "backing_reads", "same_filled_reads")),
            "store_pages": fs.get("pages_host", 0) + fs.get("pages_host_wt", 0),
            "backing_pages": fs.get("pages_backing", 0), "refused": fs.get("fallback_refused", 0),
        }
        host = fs.get("inproc_store") if state.host == INPROC else read_host_stats(StoreTarget.of(state))
        comp = host.get("compression") if isinstance(host, dict) else None
        if isinstance(comp, dict) and comp.get("mem_used_bytes"):
            out["store_ratio"] = comp["orig_data_bytes"] / comp["mem_used_bytes"]
        return out
    return read


def machine_swapins() -> dict[str, Any] | None:
    """Pages swapped in machine-wide (/proc/vmstat pswpin): the signal without a device."""
    with open(VMSTAT) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "pswpin":
                return {"swapins": int(value)}
    return None


def workload_reader(path: str) -> Any:
    def read() -> dict[str, Any] | None:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    return read


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def cmd_offload(args: argparse.Namespace) -> int:
    if args.report:
        return _report(args)
    if not args.cgroup:
        return fail("name a cgroup to offload, or give --report RECORD")
    checked = _checked(args)
    if isinstance(checked, str):
        return fail(checked)
    cg, settings = checked
    try:
        with Claim(cg.path) as claim:
            limit = cg.limit()
            found = claim.left_behind(limit)
            if found is not None:
                cg.set_limit(found)
                say(f"a controller (pid {(claim.left or {}).get('pid')}) died leaving {cg.path} at {limit}: "
                    f"put back the limit it had found, {found}")
            return _control(args, cg, settings, claim)
    except Claimed as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"offload of {cg.path}: {exc}")


def _checked(args: argparse.Namespace) -> tuple[Cgroup, Settings] | str:
    """The cgroup and the settings, or why the controller must not run."""
    try:
        cg = resolve(args.cgroup)
        settings = Settings(args.controller, Tuning(args.interval, args.step), args.pressure_threshold,
                            args.slo / 100, args.floor)
    except (CgroupError, ValueError) as exc:
        return str(exc)
    why = cg.no_swap_reason()
    if why:
        return f"will not offload {cg.path}: {why}"
    if cg.holds():
        return f"will not offload {cg.path}: this command runs inside it, and would squeeze its own memory"
    for problem in cg.missing_signals():
        if problem.startswith("pressure") and settings.controller == SENPAI:
            return f"senpai needs memory pressure: {problem}"
        say(f"warning: {problem}")
    return cg, settings


def _control(args: argparse.Namespace, cg: Cgroup, settings: Settings, claim: Claim) -> int:
    state = None if args.no_device else State.load(args.state_dir)
    device = device_reader(state) if state is not None else machine_swapins
    record = open(args.record, "a") if args.record else None
    stopping: list[str] = []
    armed = [True]  # a signal stops the loop at once, but never the restore (see _shielded)

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signal.Signals(signum).name)
        if armed[0] and len(stopping) == 1:
            raise StopRequested(f"stopped by {stopping[0]}")

    @contextlib.contextmanager
    def shielded() -> Iterator[None]:
        armed[0] = False
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        ctl = Controller(cg, settings, device=device,
                         workload=workload_reader(args.workload_metric) if args.workload_metric else None,
                         record=record, say=(lambda line: print(line, flush=True)) if not args.quiet else
                         (lambda line: None), note=claim.note, shield=shielded,
                         device_source=f"the vswapfs device in {args.state_dir} (pages read from it)" if state
                         else "machine-wide /proc/vmstat pswpin (no vswapfs device up in the state dir)")
        say(f"offloading {cg.path} (cgroup v{cg.version}) with {settings.controller}; limit found "
            f"{ctl.found_text}, floor {format_size(ctl.floor)}")
        for name, source in ctl.signals().items():
            say(f"  {name}: {source}")
        outcome = ctl.run(args.duration)
        claim.keep = not outcome.restored
    except StopRequested:  # before the loop began: nothing was changed
        return 0
    finally:
        armed[0] = False
        for s, handler in old.items():
            signal.signal(s, handler)
        if record is not None:
            record.close()
    say(f"{outcome.reason} after {outcome.ticks} ticks; "
        + (f"the limit found, {ctl.found_text}, is in place" if outcome.restored else
           f"the limit was not put back ({cg.path}: see above)"))
    return 0


def _report(args: argparse.Namespace) -> int:
    names = args.name or [p.rsplit("/", 1)[-1].removesuffix(".jsonl") for p in args.report]
    if len(names) != len(args.report):
        return fail("give as many --name as --report files")
    try:
        records = [report.load(p) for p in args.report]
        runs = [(n, report.summarize(r, args.metric)) for n, r in zip(names, records, strict=True)]
    except (OSError, ValueError) as exc:
        return fail(f"report: {exc}")
    if args.json:
        print(json.dumps(dict(runs), indent=1))
    else:
        print(report.render(report.table(runs)))
    if args.chart:
        try:
            report.chart(list(zip(names, records, strict=True)), args.chart, args.metric)
        except ImportError:
            return fail("--chart needs matplotlib: pip install 'vswapfs[chart]'")
        say(f"chart written to {args.chart}")
    return 0


DESCRIPTION = """\
Push a memory cgroup's memory into swap (whatever swap the kernel uses; vswapfs first when
its priority is the highest) while the workload does not suffer, and so find its working set.
CGROUP is a cgroup directory's path, or a path relative to the memory hierarchy's root.

controllers:
  senpai      Meta's TMO law (Senpai): every second, add the memory stall observed (PSI
              "some") to an integral; above --pressure-threshold per interval, loosen the limit
              at once (up to doubling it); else, every --interval, tighten it by up to --step.
  swapin-slo  Google's far-memory SLO: the same law on pages swapped in, against --slo percent
              of the working set (the cgroup's resident memory) per minute; counted by the
              vswapfs device up in --state-dir, or machine-wide (/proc/vmstat) without one.

The limit stepped is memory.high on cgroup v2 and memory.limit_in_bytes on v1 (the kernel
reclaims at once when it is lowered).  Pressure is the cgroup's own memory.pressure on v2
and machine-wide /proc/pressure/memory on v1.  It never goes below --floor nor above the
limit it found, puts the limit found back after an OOM kill, holds while swap is full,
refuses a cgroup with no swap to go to, and writes the limit found back when it stops
(--duration, ^C, SIGTERM).  Defaults are Senpai's (facebookincubator/senpai): --interval 6,
--step 0.01, --pressure-threshold 10000, --floor 100M.

  vswapctl offload --report RUN.jsonl [RUN2.jsonl ...]  prints a run's figures side by side.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("offload", help="push a cgroup's memory into swap and find its working set",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cgroup", nargs="?", help="the memory cgroup: a path, or relative to the hierarchy's root")
    p.add_argument("--controller", choices=CONTROLLERS, default=SENPAI, help=f"the law (default {SENPAI})")
    p.add_argument("--interval", type=argtype(positive), default=Tuning.interval,
                   help="seconds between probes (default %(default)s)")
    p.add_argument("--step", type=argtype(_fraction), default=Tuning.step,
                   help="largest tightening per probe, a fraction of the limit (default %(default)s)")
    p.add_argument("--pressure-threshold", type=argtype(positive), default=DEFAULT_PRESSURE_US, metavar="US",
                   help="senpai: microseconds of memory stall per interval above which it backs off "
                        "(default %(default)s)")
    p.add_argument("--slo", type=argtype(positive), default=DEFAULT_SLO * 100, metavar="PERCENT",
                   help="swapin-slo: swap-ins per minute allowed, in percent of the working set "
                        "(default %(default)s)")
    p.add_argument("--floor", type=argtype(parse_size), default=DEFAULT_FLOOR, metavar="SIZE",
                   help="never push the limit below this (default 100M)")
    p.add_argument("--duration", type=argtype(positive), metavar="SECONDS", help="stop after this long")
    p.add_argument("--record", metavar="FILE", help="append a JSON line per second (the input of --report)")
    p.add_argument("--workload-metric", metavar="FILE",
                   help="a JSON object the workload rewrites with its own figures (throughput, latency); "
                        "recorded each second")
    p.add_argument("--no-device", action="store_true",
                   help="do not read the vswapfs device up in --state-dir (swap-ins from /proc/vmstat)")
    p.add_argument("--quiet", action="store_true", help="no progress line per second")
    p.add_argument("--report", nargs="+", metavar="RECORD", help="print the figures of recorded runs and exit")
    p.add_argument("--name", action="append", help="a name per --report file, in order")
    p.add_argument("--metric", help="the workload figure --report shows (default: its first number)")
    p.add_argument("--chart", metavar="FILE.png", help="with --report: draw the runs (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="with --report: print the figures as JSON")
    p.set_defaults(func=cmd_offload)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"{text} is not a fraction between 0 and 1")
    return value
