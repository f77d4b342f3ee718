"""Looking inside: ``status``, ``stats``, ``trace``, ``top``, ``record`` and ``plot``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from typing import Any

import trio

from pagewire.address import INPROC
from vswapcommon.cliutil import argtype, count
from pagewire.messages import PAGE_SIZE
from vswapcommon.sizes import format_size

from .. import system
from ..cachemount import CacheState
from ..state import State
from .cache import cache_figures, cache_status
from .common import (CONTROL_TIMEOUT, WITH_HOST_ONLY, StoreTarget, fail, need_state, pressure_risks,
                     read_host_stats, read_vswapfs_stats, say, store_options,
                     store_target, table)


def _running(ident: Any) -> str:
    if ident is None:
        return "not started by up"
    if ident.stopped():
        return f"pid {ident.pid} STOPPED (SIGSTOP)"
    return f"pid {ident.pid} running" if ident.alive() else f"pid {ident.pid} NOT RUNNING"


def cmd_status(args: argparse.Namespace) -> int:
    cache_state = CacheState.load(args.state_dir)
    if cache_state is not None and State.load(args.state_dir) is None:  # a cache alone
        status = {"cache": cache_status(cache_state)}
        if args.json:
            print(json.dumps(status, indent=1))
        else:
            _cache_rows(status["cache"])
        return 0
    state = need_state(args)
    fs = read_vswapfs_stats(state)
    swap = system.swaps().get(state.loop) if state.loop else None
    fs_ok = isinstance(fs, dict)
    status: dict[str, Any] = {
        "loop": state.loop or None,
        "direct_io": system.loop_dio(state.loop) if state.loop else None,
        "swap": swap,
        "mountpoint": state.mountpoint,
        "mounted": system.mount_type(state.mountpoint) == "fuse.vswapfs",
        "vswapfs": _running(state.vswapfs_id),
        "host": state.host,
        "hoststore": _running(state.hoststore_id) if state.hoststore_id else
        "in vswapfs" if state.host == INPROC else "external",
        "backing": state.backing,
        "pages": {k: fs.get(f"pages_{k}", 0) for k in ("host", "host_and_backing", "backing", "same_filled",
                                                       "unwritten", "lost_now")}
        if fs_ok else None,
        "host_connected": fs["host_connected"] if fs_ok else None,
        "vswapfs_stats": None if fs_ok else fs,
        "pressure_risks": pressure_risks(state, fs),
        "compression": _compression(state, fs),
    }
    if cache_state is not None:
        status["cache"] = cache_status(cache_state)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    _status_rows(state, status, fs)
    if cache_state is not None:
        _cache_rows(status["cache"])
    return 0


def _status_rows(state: State, status: dict[str, Any], fs: dict[str, Any] | str) -> None:
    fs_ok = isinstance(fs, dict)
    swap = status["swap"]
    dev = state.loop or "(no loop device: up --no-swap)"
    if swap:
        dev += f"  swap on, priority {swap['priority']}, used {format_size(swap['used_kib'] * 1024)} " \
               f"of {format_size(swap['size_kib'] * 1024)}"
    if state.loop:
        dev += f"  direct I/O {'on' if status['direct_io'] else 'off'}"
    rows = [
        ("device", dev),
        ("vswapfs", f"{status['vswapfs']}, {state.mountpoint}" + ("" if status["mounted"] else " (NOT MOUNTED)")),
        ("host store", f"{state.host} ({status['hoststore']})" + (
            "" if not fs_ok else ", connected" if fs["host_connected"] else ", NOT CONNECTED")),
        ("backing", state.backing),
    ]
    risks = status["pressure_risks"]
    rows.append(("machine-wide pressure", "unknown: " + risks if isinstance(risks, str) else
                 "configured for it" if not risks else "NOT configured for it: " + "; ".join(risks)))
    if fs_ok:
        pages = status["pages"]
        rows.append(("pages", f"host {pages['host']} ({format_size(pages['host'] * PAGE_SIZE)})  "
                              f"host+backing {pages['host_and_backing']}  "
                              f"backing {pages['backing']} ({format_size(pages['backing'] * PAGE_SIZE)})  "
                              f"same-filled {pages['same_filled']}  "
                              f"never written {pages['unwritten']}  lost {pages['lost_now']}"))
    else:
        rows.append(("pages", f"unknown: {fs}"))
    comp = status["compression"]
    if comp:
        ratio = f"{comp['ratio']:.2f}:1" if comp.get("ratio") else "nothing held yet"
        rows.append(("compression", f"{comp['algorithm']}: {format_size(comp['orig_data_bytes'])} of pages in "
                                    f"{format_size(comp['mem_used_bytes'])} of memory ({ratio}), "
                                    f"{comp['incompressible_pages']} pages kept as they are"))
    table(rows)


def _cache_rows(cache: dict[str, Any]) -> None:
    table([("cache", f"{cache['summary']}; fscache {cache['fscache']}" +
            ("" if cache["mounted"] else " (NOT MOUNTED)") + f", store {cache['host']}")])


def _compression(state: State, fs: dict[str, Any] | str) -> dict[str, Any] | None:
    """The store's compression figures (``hoststore --compress``), if it compresses."""
    if state.host == INPROC:
        host = fs.get("inproc_store") if isinstance(fs, dict) else None
    else:
        host = read_host_stats(StoreTarget.of(state))
    comp = host.get("compression") if isinstance(host, dict) else None
    return comp if isinstance(comp, dict) else None


def cmd_stats(args: argparse.Namespace) -> int:
    cache_state = CacheState.load(args.state_dir)
    if cache_state is not None and State.load(args.state_dir) is None:  # a cache alone
        return _print_stats({}, cache_state, args.json)
    state = need_state(args)
    fs = read_vswapfs_stats(state)
    if state.host == INPROC:  # the store lives in vswapfs: its counters came with vswapfs's
        host = fs.pop("inproc_store", "not reported") if isinstance(fs, dict) else "inside vswapfs, which " + fs
    else:
        host = read_host_stats(StoreTarget.of(state))
    return _print_stats({"vswapfs": fs, "hoststore": host}, cache_state, args.json)


def _print_stats(sections: dict[str, Any], cache_state: CacheState | None, as_json: bool) -> int:
    """Each daemon's counters, a section each; with a cache up, its ``cache`` section (and
    the rest of fscache's figures)."""
    if cache_state is not None:
        sections["cache"], sections["fscache"] = cache_figures(cache_state)
    if as_json:
        print(json.dumps(sections, indent=1, sort_keys=True))
        return 0
    for name, figures in sections.items():
        print(name + (f": {figures}" if isinstance(figures, str) else ""))
        if isinstance(figures, dict):
            table(sorted(_flatten(figures)), indent="  ")
    return 0


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def format_event(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event["time"])) + f".{int(event['time'] * 1000) % 1000:03d}"
    kind, client = event["event"], event.get("client", "?")
    if kind == "put":
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(event["refused"].items()))
        return (f"{when} put        {client}: pages {event['first']}+{event['pages']}: stored {event['stored']}"
                + (f", refused {refused}" if refused else "") + f"  (used {event['used_percent']:.1f}%, "
                f"policy {event['policy']})")
    if kind == "handback":
        return (f"{when} handback   {client}: {event['pages']} pages ({event['cause']}): freed {event['freed']}, "
                f"not needed {event['not_needed']}, failed {event['failed']}")
    return f"{when} {kind:<10} {client}: {event.get('pages', '?')} pages"


def cmd_trace(args: argparse.Namespace) -> int:
    from pagewire.auth import TokenError
    from pagewire.messages import TraceRead
    from vswapfs.hostclient import StoreError, StoreUnavailable, follow

    target = store_target(args, "the trace needs one")
    if isinstance(target, str):
        return fail(target)
    address = target.address

    def show(answer: dict[str, Any]) -> None:
        if answer["dropped"]:
            print(json.dumps({"event": "dropped", "events": answer["dropped"]}) if args.json
                  else f"... {answer['dropped']} events dropped (this reader was too slow)", flush=True)
        for event in answer["events"]:
            print(json.dumps(event, sort_keys=True) if args.json else format_event(event), flush=True)

    try:
        token = target.token()
        try:
            trio.run(partial(follow, address, TraceRead(sample=args.sample, wait=1.0), show, CONTROL_TIMEOUT,
                             token, insecure_tcp=target.insecure_tcp))
        except* KeyboardInterrupt:  # ^C is how a trace ends (trio may hand it over in a group)
            pass
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return fail(f"trace of {address}: {exc}")
    return 0


def _readers(args: argparse.Namespace) -> tuple[Any, Any, str, Any] | str:
    """(read vswapfs's stats, read the store's, a title, read the cache's or None); a str says why not."""
    if args.host is not None:
        target = store_target(args, "")
        if isinstance(target, str):
            return target
        return (lambda: None), (lambda: read_host_stats(target)), f"store {args.host}", None
    if args.token_file or args.insecure_tcp:
        return WITH_HOST_ONLY
    readers = _device_readers(State.load(args.state_dir))
    cache_state = CacheState.load(args.state_dir)
    if cache_state is None:
        return readers if readers is not None else \
            f"no device or cache is up in {args.state_dir} (give --host ADDR to watch a store alone)"

    def cache() -> Any:
        return cache_figures(cache_state)[0]

    if readers is None:
        return (lambda: None), (lambda: None), f"cache {cache_state.mountpoint}", cache
    return readers[0], readers[1], readers[2] + f"; cache {cache_state.mountpoint}", cache


def _device_readers(state: State | None) -> tuple[Any, Any, str, None] | None:
    if state is None:
        return None
    if state.host == INPROC:
        def store() -> Any:
            fs = read_vswapfs_stats(state)
            return fs.get("inproc_store") if isinstance(fs, dict) else None
        return (lambda: read_vswapfs_stats(state)), store, f"vswapfs {state.mountpoint} (inproc store)", None
    return ((lambda: read_vswapfs_stats(state)), (lambda: read_host_stats(StoreTarget.of(state))),
            f"vswapfs {state.mountpoint}, store {state.host}", None)


def _samples(args: argparse.Namespace, readers: tuple[Any, Any, str, Any]) -> Any:
    from .. import watch

    n = 0
    while args.count is None or n < args.count:
        if n:
            time.sleep(args.interval)
        yield watch.take(readers[0], readers[1], readers[3])
        n += 1


def cmd_top(args: argparse.Namespace) -> int:
    from .. import watch

    readers = _readers(args)
    if isinstance(readers, str):
        return fail(readers)
    clear = "\033[H\033[2J" if sys.stdout.isatty() else "\n"
    previous = None
    try:
        for sample in _samples(args, readers):
            per_second = watch.rates(previous, sample) if previous else {}
            print(clear + watch.render(sample, per_second, readers[2]), flush=True)
            previous = sample
    except KeyboardInterrupt:
        pass
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from .. import watch

    readers = _readers(args)
    if isinstance(readers, str):
        return fail(readers)
    fmt = "csv" if args.file.endswith(".csv") else "json"
    header = None
    n = 0
    try:
        with open(args.file, "a", newline="") as out:
            for sample in _samples(args, readers):
                header = watch.write_sample(out, sample, fmt, header)
                out.flush()
                n += 1
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        return fail(f"{args.file}: {exc.strerror or exc}")
    say(f"recorded {n} samples to {args.file}")
    return 0


def _offload_record(path: str) -> list[dict[str, Any]] | None:
    """The lines of ``vswapctl offload --record`` if ``path`` is one, else None."""
    from offload import report

    try:
        with open(path) as f:
            first = json.loads(f.readline() or "null")
    except (OSError, ValueError):
        return None
    if isinstance(first, dict) and first.get("kind") == "start" and "controller" in first:
        return report.load(path)
    return None


def cmd_plot(args: argparse.Namespace) -> int:
    from .. import watch

    lines = _offload_record(args.file)
    if lines is not None:
        from offload import report

        try:
            report.chart([(os.path.basename(args.file), lines)], args.output)
        except ImportError:
            return fail("plot needs matplotlib, an optional extra: pip install 'vswapfs[chart]'")
        except ValueError as exc:
            return fail(f"cannot plot {args.file}: {exc}")
        say(f"plotted the offload run {args.file} to {args.output}")
        return 0
    try:
        samples = watch.read_recording(args.file)
        watch.plot(samples, args.output)
    except ImportError:
        return fail("plot needs matplotlib, an optional extra: pip install 'vswapfs[chart]'")
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"cannot plot {args.file}: {exc}")
    say(f"plotted {len(samples)} samples to {args.output}")
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to ``vswapctl``'s subparsers."""
    _add_status(sub)
    _add_stats(sub)
    _add_trace(sub)
    _add_top_and_record(sub)
    _add_plot(sub)


def _add_status(sub: Any) -> None:
    status = sub.add_parser("status", help="the device, the daemons, and where the pages live (and the cache, "
                                           "if one is up)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def _add_stats(sub: Any) -> None:
    stats = sub.add_parser("stats", help="both daemons' counters (and the cache's, in a `cache` section, if one "
                                         "is up)")
    stats.add_argument("--json", action="store_true", help="machine-readable")
    stats.set_defaults(func=cmd_stats)


def _add_trace(sub: Any) -> None:
    tr = sub.add_parser("trace", help="follow the store's decisions as they happen",
                        description="Print the store's admission decisions, hand-backs and invalidations as "
                                    "they happen (root or the store's own user only), until ^C.  Bounded: a "
                                    "reader that falls behind loses the oldest events (and is told how many); "
                                    "the store never waits for it.")
    tr.add_argument("--json", action="store_true", help="one JSON object per line")
    tr.add_argument("--sample", type=argtype(count), default=1,
                    metavar="N", help="every Nth event only (default 1: all)")
    store_options(tr)
    tr.set_defaults(func=cmd_trace)


def _add_top_and_record(sub: Any) -> None:
    for name, helptext in (("top", "a live view of both daemons, refreshed in place"),
                           ("record", "sample both daemons' counters to a file (JSON lines, or CSV for .csv)")):
        w = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ", every "
                           "INTERVAL seconds until ^C (or COUNT samples); from the device (and the FS-cache) in "
                           "the state directory, or a store alone with --host.")
        if name == "record":
            w.add_argument("file", metavar="FILE")
        w.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default 1")
        w.add_argument("--count", type=argtype(count), metavar="N", help="stop after N samples")
        store_options(w, host_help="watch this store alone")
        w.set_defaults(func=cmd_top if name == "top" else cmd_record)


def _add_plot(sub: Any) -> None:
    pl = sub.add_parser("plot", help="draw a recording (vswapctl record) as a chart",
                        description="Pages by where they live, and the rates of pages in and out, over time; "
                                    "or, for a record of `vswapctl offload`, its resident memory, limit, stall "
                                    "and workload figure (matplotlib: pip install 'vswapfs[chart]').")
    pl.add_argument("file", metavar="FILE")
    pl.add_argument("-o", "--output", required=True, metavar="OUT.png")
    pl.set_defaults(func=cmd_plot)
