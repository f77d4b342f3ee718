"""``vswapctl cache up`` and ``cache down``: an FS-cache mount (``fscache``) and its store."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from pagewire.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from pagewire.address import INPROC, parse_store_address
from pagewire.codec import DEFAULT_COMPRESS, add_compress_arguments, recompress_problem
from vswapcommon.cliutil import argtype, count as positive_int, positive
from vswapcommon.sizes import format_size

from .. import cachemount, device, system
from ..state import Busy
from .common import fail, interrupt, page_size, say, table
from .lifecycle import absolute_host, absolute_source, recompress_argv

DEFAULT_CAPACITY = "256M"


def cmd_cache_up(args: argparse.Namespace) -> int:
    if args.token_file and not args.host:
        return fail("--token-file is for a store at --host; the store cache up starts listens on a private socket")
    if args.host and args.host.kind != INPROC and (args.policy or args.compress != DEFAULT_COMPRESS):
        return fail("--policy and --compress are for the store cache up starts; a store at --host has its own")
    if args.host and args.host.kind == INPROC and args.policy:
        return fail("--policy is for a store daemon; --host inproc admits by its watermarks and --capacity")
    problem = recompress_problem(args) or check_tcp_options([args.host] if args.host else [],
                                                             bool(args.token_file), args.insecure_tcp)
    if problem:
        return fail(problem)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    cfg = cachemount.CacheConfig(
        lower=os.path.abspath(args.lower), mountpoint=system.resolve_mountpoint(args.mountpoint),
        host=absolute_host(args.host), capacity=args.capacity, size=args.size,
        token_file=os.path.abspath(args.token_file) if args.token_file else "", insecure_tcp=args.insecure_tcp,
        pressure_source=absolute_source(args.pressure_source), policy=args.policy,
        store_args=["--compress", args.compress, *recompress_argv(args)], verbose=args.verbose,
        start_timeout=args.start_timeout)
    try:
        state = cachemount.bring_up(args.state_dir, cfg, say)
    except (device.UpFailed, device.Stopped, Busy) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted; what cache up had done was undone")
    say(f"cache up: {state.mountpoint} presents {state.lower}; `vswapctl stats` shows its `cache` section")
    return 0


def cmd_cache_down(args: argparse.Namespace) -> int:
    try:
        done = cachemount.take_down(args.state_dir, say)
    except (device.Stopped, Busy) as exc:
        return fail(f"cache down stopped: {exc}")
    except (system.CommandFailed, OSError) as exc:
        return fail(f"cache down stopped: {exc}; run it again once that is fixed")
    if not done:
        return fail(f"no cache is up (no state in {cachemount.cache_dir(args.state_dir)})")
    say("cache down")
    return 0


def register(sub: Any) -> None:
    cache = sub.add_parser("cache", help="an FS-cache mount: LOWER's clean pages kept in a host store",
                           description="A stacked FUSE filesystem (fscache) presenting the tree LOWER at "
                                       "MOUNTPOINT; clean pages of file data read through it go to a host store "
                                       "as an ephemeral pool, which may drop any of them at any time.")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    _add_up(csub)
    _add_bench(csub)
    down = csub.add_parser("down", help="unmount the cache and stop the store cache up started",
                           description="Unmount (refused while anything uses the mount: nothing is lost, LOWER "
                                       "holds every page) and stop what cache up started.")
    down.set_defaults(func=cmd_cache_down)


def _add_up(csub: Any) -> None:
    up = csub.add_parser("up", help="mount LOWER's tree at MOUNTPOINT through the cache",
                         description="Start a hoststore (unless --host) and mount fscache: LOWER's tree at "
                                     "MOUNTPOINT, whole pages of file data read from LOWER offered to the store's "
                                     "ephemeral pool, served from there when the kernel's page cache no longer "
                                     "has them.  State in STATE_DIR/cache.")
    up.add_argument("lower", metavar="LOWER", help="the directory to present")
    up.add_argument("mountpoint", metavar="MOUNTPOINT", help="where (an empty directory; created if missing)")
    up.add_argument("--host", type=argtype(parse_store_address), metavar="ADDR",
                    help="use a running hoststore (unix:PATH or tcp:HOST:PORT; its --quota for this client "
                         "splits its --capacity between pools), or `inproc`: the pages in fscache's own memory")
    up.add_argument("--capacity", type=argtype(page_size), default=page_size(DEFAULT_CAPACITY), metavar="SIZE",
                    help=f"the most page data the store cache up starts holds (default {DEFAULT_CAPACITY})")
    up.add_argument("--size", type=argtype(page_size), default=page_size("1G"), metavar="SIZE",
                    help="how much file data the cache can keep track of at once (default 1G)")
    up.add_argument("--pressure-source", metavar="SOURCE",
                    help="the store's pressure source: psutil (default) or file:PATH (a used-memory percentage)")
    up.add_argument("--policy", metavar="SPEC", help="the started store's admission policy (hoststore --policy)")
    add_compress_arguments(up, whose="for the store cache up starts: ")
    up.add_argument("--token-file", metavar="PATH", help="with --host: the store's shared token (mode 0600)")
    up.add_argument("--insecure-tcp", action="store_true",
                    help=f"with --host tcp:HOST:PORT on loopback and no --token-file: {INSECURE_TCP_GIVES_UP}")
    up.add_argument("--start-timeout", type=argtype(positive), default=device.READY_TIMEOUT, metavar="SECONDS",
                    help=f"how long each daemon may take to be ready (default {device.READY_TIMEOUT:g})")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging in the daemons' logs")
    up.set_defaults(func=cmd_cache_up)


def cmd_cache_bench(args: argparse.Namespace) -> int:
    from .. import cachebench, cgroup

    if os.geteuid() != 0:
        return fail("cache bench needs root (memory cgroups, FUSE)")
    try:
        cgroup.detect()
    except cgroup.CgroupUnavailable as exc:
        return fail(str(exc))
    progress = (lambda m: print(f"vswapctl: {m}", file=sys.stderr, flush=True)) if args.json else say
    directory = tempfile.mkdtemp(prefix="vswapctl-cachebench-", dir=args.dir)
    cfg = cachebench.CacheBenchConfig(directory, tree=args.tree, limit=args.limit, reclaim=args.reclaim,
                                      runs=args.runs)
    try:
        report = cachebench.run(cfg, progress)
    except (cachebench.CacheBenchError, device.UpFailed, device.Stopped, Busy, cgroup.CgroupUnavailable) as exc:
        return fail(f"cache bench: {exc}")
    finally:
        cachemount.take_down(os.path.join(directory, "state"), lambda m: None)
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    m = report["medians"]
    table([
        ("read, LOWER cold", f"{m['lower_cold']:.2f} s"),
        ("read through the cache, first pass", f"{m['cache_first']:.2f} s"),
        ("read through the cache, second pass", f"{m['cache_second']:.2f} s ({m['second_pass_vs_lower_cold']:.2f}x "
                                                f"LOWER cold; {100 * m['second_pass_host_share']:.0f}% of whole "
                                                f"pages from the store)"),
        ("LOWER resident after it", f"{100 * m['lower_resident_share']:.1f}%"),
        ("memory back: dropping the pool", f"{m['dropped_bytes'] / 2**20:.0f} MiB in {m['drop_seconds']:.3f} s "
                                            f"({m['handed_back_pages']} pages written anywhere)"),
        ("memory back: reclaiming page cache", f"{m['reclaimed_bytes'] / 2**20:.0f} MiB in "
                                                f"{m['reclaim_seconds']:.3f} s"),
    ])
    say(f"medians of {args.runs} runs; every file's sha256 matched LOWER's")
    return 0


def _add_bench(csub: Any) -> None:
    from ..cachebench import __doc__ as doc

    bench = csub.add_parser("bench", help="reads through the cache against LOWER cold; memory back by dropping "
                                          "against reclaim", description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--tree", type=argtype(page_size), default=page_size("512M"), metavar="SIZE",
                       help="the tree read twice (default 512M)")
    bench.add_argument("--limit", type=argtype(page_size), default=page_size("64M"), metavar="SIZE",
                       help="the reader's memory cgroup limit (default 64M)")
    bench.add_argument("--reclaim", type=argtype(page_size), default=page_size("1G"), metavar="SIZE",
                       help="how much memory to get back each way (default 1G)")
    bench.add_argument("--runs", type=argtype(positive_int), default=3, metavar="N", help="default 3")
    bench.add_argument("--dir", default="/var/tmp", metavar="DIR",
                       help="where to write the trees (a disk filesystem, not tmpfs; default /var/tmp); "
                            "removed afterwards")
    bench.add_argument("--json", action="store_true", help="the report as JSON (progress goes to stderr)")
    bench.set_defaults(func=cmd_cache_bench)


def describe(stats: dict[str, Any]) -> str:
    """One line of what a cache holds and serves (for ``vswapctl status``)."""
    c = stats.get("cache", {})
    served = c.get("host_hits", 0) + c.get("host_misses", 0)
    rate = f"{100 * c.get('host_hits', 0) / served:.0f}% of whole pages read from the store" if served else \
        "nothing read yet"
    held = c.get("host_pages")
    return (f"{stats.get('lower')} at {stats.get('mountpoint')}: "
            f"{'?' if held is None else format_size(held * 4096)} in the store, {rate}")


def cache_figures(state: cachemount.CacheState) -> tuple[dict[str, Any] | str, dict[str, Any] | str]:
    """The cache's section and the rest of fscache's figures, or why there are none."""
    stats = cachemount.stats(state)
    if stats is None:
        why = f"fscache does not answer on {state.control} (not running, or stopped?)"
        return why, why
    section = stats.pop("cache", {})
    return section, stats


def cache_status(state: cachemount.CacheState) -> dict[str, Any]:
    stats = cachemount.stats(state)
    ident = cachemount.ProcessId.from_dict(state.fscache)
    return {"lower": state.lower, "mountpoint": state.mountpoint, "host": state.host,
            "mounted": system.mount_type(state.mountpoint) == cachemount.FSTYPE,
            "fscache": "not running" if ident is None or not ident.alive() else f"pid {ident.pid} running",
            "summary": describe(stats) if stats is not None else "fscache does not answer",
            "counters": stats.get("cache") if stats is not None else None}
