"""Measuring and provoking: ``microbench``, ``membench``, ``bench``, ``attack``, ``faults`` and ``workload``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from typing import Any


from vswapcommon.cliutil import argtype, count, cpu_number
from pagewire.messages import PAGE_SIZE
from vswapcommon.sizes import format_size, parse_size

from .. import launch, system
from ..workload import DATA_KINDS
from .common import fail, interrupt, page_size, say


def cmd_microbench(args: argparse.Namespace) -> int:
    from .. import microbench

    report = microbench.run(args.seconds)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"the page path through each transport ({args.seconds}s per measurement, pages/s; higher is better)")
    rows = [["transport", "batch", "write pages/s", "read pages/s", "1-page read p50 / p99"]]
    for name, result in report["transports"].items():
        for batch in microbench.BATCHES:
            e = result[str(batch)]
            latency = f"{e['read_p50_us']} / {e['read_p99_us']} us" if batch == 1 else ""
            rows.append([name if batch == 1 else "", str(batch), str(e["write_pages_per_s"]),
                         str(e["read_pages_per_s"]), latency])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    costs = ", ".join(f"{batch}: {c['write_us_per_page']:.2f} / {c['read_us_per_page']:.2f}"
                      for batch, c in report["checksum"].items())
    print(f"checksum (XXH3) per page, write / read, us, by batch: {costs}")
    return 0


def cmd_membench(args: argparse.Namespace) -> int:
    from .. import membench

    report = membench.run(args.device_size, args.size // PAGE_SIZE)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"memory for {format_size(args.size)} of pages stored, device {format_size(args.device_size)}")
    rows = [["layout", "store bytes per byte stored", "store memory given back", "vswapfs RSS (own + store's "
             "shared pages mapped)"]]
    for name, r in report.items():
        rows.append([name, f"{r['store_bytes_per_byte_stored']:.4f}", f"{r['store_given_back']:.0%}",
                     f"{format_size(r['pager_rss_own'])} + {format_size(r['pager_rss_shared_pages'])}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .. import attack

    reports = [attack.run(args.seconds) for _ in range(args.runs)]
    if args.json:
        print(json.dumps(reports if args.runs > 1 else reports[0], indent=1))
        return 0

    def median(path: tuple[str, str]) -> float:
        return statistics.median(r[path[0]][path[1]] for r in reports)

    print(f"a hoststore under {sum(attack.KINDS.values())} hostile loopback connections from "
          f"{len(attack.SOURCES)} addresses ({', '.join(f'{n} {k}' for k, n in attack.KINDS.items())}); "
          f"medians of {args.runs} run(s) of {args.seconds:g}s")
    for label, key in (("pager alone", "good_alone"), ("pager under attack", "good_under_attack"),
                       ("observer alone", "observer_alone"), ("observer under attack", "observer_under_attack")):
        print(f"  {label:<26} p50 {median((key, 'p50_ms')):.2f} ms  p99 {median((key, 'p99_ms')):.2f} ms  "
              f"requests {median((key, 'requests')):.0f}")
    print(f"  handed back (both phases)  {median(('handed_back', 'pages')):.0f} pages to "
          f"{attack.HANDED_BACK_CLIENTS} clients; their disconnects (all runs) "
          f"{sum(r['handed_back']['disconnects'] for r in reports)}")
    print(f"  store RSS growth (peak)    {median(('rss_kib', 'growth')) / 1024:.1f} MiB over its peak before the attack "
          f"({median(('rss_kib', 'growth_over_before')) / 1024:.1f} MiB over its RSS just before)")
    print(f"  store CPU under attack     {statistics.median(r['cpu_percent_under_attack']['store'] for r in reports):.0f}%")
    print("  closed or refused, by reason (last run):")
    for reason, n in reports[-1]["closed_by_reason"].items():
        print(f"    {reason:<26} {n}")
    return 0 if all(r["store_alive"] for r in reports) else 1


def cmd_faults(args: argparse.Namespace) -> int:
    from .. import faults

    if args.rounds < 1 or args.pages < 256:
        return fail("--rounds must be at least 1 and --pages at least 256")
    modes = ["writeback", "writethrough"] if args.mode == "both" else [args.mode]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    say(f"fault run: {args.rounds} round(s) per mode, {args.pages}-page device, seed {seed}")
    results = faults.run(args.rounds, args.pages, modes, seed, say=(lambda m: None) if args.json else say)
    report = faults.summary(results)
    report["seed"] = seed
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"pages verified   {report['pages_verified']}")
        print(f"faults injected  {report['faults_injected']}")
        print(f"pages lost       {report['pages_lost']} (expected {report['pages_lost_expected']}: "
              f"{'as expected' if report['all_losses_expected'] else 'NOT AS EXPECTED'})")
        print(f"wrong pages      {report['wrong_pages']}")
    return 0 if report["wrong_pages"] == 0 and report["all_losses_expected"] else 1


def cmd_workload(args: argparse.Namespace) -> int:
    from .. import cgroup

    try:
        cg = cgroup.create(f"vswapctl-workload-{os.getpid()}", args.limit)
    except cgroup.CgroupUnavailable as exc:
        return fail(str(exc))
    try:
        argv = launch.module_argv("vswapctl.workload", "--size", str(args.size), "--passes", str(args.passes),
                                  "--data", args.data)
        done = cg.run(argv, cwd=launch.WORKDIR)
    finally:
        cg.remove()
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode < 0:
        return fail(f"workload killed by signal {-done.returncode} (OOM? is swap on and large enough?)")
    return done.returncode


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench, benchreport, cgroup

    small = args.small_capacity or args.size // 4 // PAGE_SIZE * PAGE_SIZE
    cfg = bench.BenchConfig(size=args.size, limit=args.limit, device_size=args.device_size, small_capacity=small,
                            runs=args.runs, targets=args.targets, data=args.data, workload_cpu=args.workload_cpu)
    problems = bench.check_config(cfg)
    if problems:
        return fail("; ".join(problems))
    if os.geteuid() != 0:
        return fail("bench needs root (swap devices, loop devices, memory cgroups)")

    def progress(message: str) -> None:  # with --json, stdout is the report's alone
        print(f"vswapctl: {message}", file=sys.stderr if args.json else sys.stdout, flush=True)

    # SIGTERM or a closed terminal mid-run: the running target is taken down, as for ^C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        report = bench.bench(cfg, progress)
    except (bench.BenchError, cgroup.CgroupUnavailable, system.CommandFailed) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted; the target that was running has been taken down (unless a message above "
                     "says what was left)")
    print(json.dumps(report, indent=1) if args.json else benchreport.format_table(report), flush=True)
    if args.chart:
        try:
            benchreport.write_chart(report, args.chart)
        except (OSError, ValueError) as exc:
            return fail(f"chart not written: {exc}")
        progress(f"chart written to {args.chart}")
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to ``vswapctl``'s subparsers."""
    _add_microbench(sub)
    _add_membench(sub)
    _add_attack(sub)
    _add_faults(sub)
    _add_workload(sub)
    _add_bench(sub)


def _add_microbench(sub: Any) -> None:
    mb = sub.add_parser("microbench", help="the page path without the kernel: pages/s per batch size and transport",
                        description="Write and read batches of 1, 8, 64 and 256 pages through the pager (no "
                                    "FUSE, no swap) and each kind of store: inproc (in this process), a "
                                    "hoststore process on a unix socket with shared page memory, the same "
                                    "without it, and on loopback TCP; report pages per second, 1-page read "
                                    "latency and the per-page cost of the integrity check.")
    mb.add_argument("--seconds", type=float, default=1.0, help="per measurement (default 1)")
    mb.add_argument("--json", action="store_true")
    mb.set_defaults(func=cmd_microbench)


def _add_membench(sub: Any) -> None:
    mem = sub.add_parser("membench", help="memory per page stored in the store, and vswapfs's own RSS",
                         description="Store SIZE of pages from a pager process (a device of DEVICE_SIZE) in a "
                                     "hoststore process, read them back, release them; report the store's "
                                     "resident memory per byte of pages stored and how much of it it gives "
                                     "back, and the pager's resident memory.  Packed runs (swap's clusters), "
                                     "runs spread over the whole device, and packed without shared memory.")
    mem.add_argument("--device-size", type=argtype(page_size), default=parse_size("4G"),
                     help="the pager's device (a backing file this big is made in /var/tmp; default 4G)")
    mem.add_argument("--size", type=argtype(page_size), default=parse_size("256M"),
                     help="page data stored (default 256M)")
    mem.add_argument("--json", action="store_true")
    mem.set_defaults(func=cmd_membench)


def _add_attack(sub: Any) -> None:
    atk = sub.add_parser("attack", help="hostile connections against a hoststore while good clients work",
                         description="Start a hoststore (with a token) on a private unix socket and loopback TCP; "
                                     "time a good pager's 8-page puts and gets and an admin's stats on the unix "
                                     "socket alone, then while about 50 hostile TCP connections from 127.0.0.2-7 "
                                     "(garbage, oversized frames, a byte a second, never a hello, connection "
                                     "floods, hellos without the token, and with it: get floods, gets never "
                                     "read, invalidate streams, largest puts stalled a byte short) run from "
                                     "another process, and four more good clients on the unix socket are "
                                     "handed their pages back under pressure (the store's pressure is a file "
                                     "set high during the attack, its policy accept-all; every connection "
                                     "limit and timeout is the store's default); report latencies, pages "
                                     "handed back and the good clients' disconnects, the store's peak RSS "
                                     "growth and connections closed by reason.")
    atk.add_argument("--seconds", type=float, default=10.0, help="per measurement (default 10)")
    atk.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    atk.add_argument("--json", action="store_true")
    atk.set_defaults(func=cmd_attack)


def _add_faults(sub: Any) -> None:
    flt = sub.add_parser("faults", help="inject faults into a store and account for every page",
                         description="On a mounted vswapfs file (no swap), write random pages, inject a fault "
                                     "into the store (SIGKILL, SIGSTOP, SIGTERM, hostile connections), read "
                                     "every page back and count: verified, lost (and whether the design "
                                     "says that fault loses them), wrong (must be 0).")
    flt.add_argument("--rounds", type=int, default=8, help="rounds per mode, one fault each (default 8)")
    flt.add_argument("--pages", type=int, default=4096, help="device size in pages (default 4096)")
    flt.add_argument("--mode", choices=["writeback", "writethrough", "both"], default="both")
    flt.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    flt.add_argument("--json", action="store_true")
    flt.set_defaults(func=cmd_faults)


def _add_workload(sub: Any) -> None:
    work = sub.add_parser("workload", help="run a verifying workload in a memory cgroup",
                          description="Fill SIZE of memory with per-page patterns inside a memory cgroup "
                                      "limited to LIMIT, read it all back and verify every page.")
    work.add_argument("--size", type=argtype(page_size), default=parse_size("256M"),
                      help="memory the workload fills (default 256M)")
    work.add_argument("--limit", type=argtype(page_size), default=parse_size("64M"),
                      help="its memory cgroup's limit: the rest goes to swap (default 64M)")
    work.add_argument("--passes", type=argtype(count), default=2, help="verification passes (default 2)")
    work.add_argument("--data", choices=DATA_KINDS, default="incompressible",
                      help="page contents: incompressible (default), compressible or json (see `vswapctl bench "
                           "--help`)")
    work.set_defaults(func=cmd_workload)


def _add_bench(sub: Any) -> None:
    from .. import bench as benchlib
    from .. import benchreport

    bench = sub.add_parser(
        "bench", help="the workload through zram, a loop device and vswapfs: medians and ratios",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the verifying workload (SIZE of memory in a memory cgroup of LIMIT, so most of it is\n"
                    "swapped) through each target, RUNS times, interleaved (zram loop inproc ... zram loop ...),\n"
                    "each target set up fresh for every run and taken down after it.  Reports each phase's\n"
                    "median: fill (swap-out), sequential verify and random verify (swap-in), in seconds, and\n"
                    "the ratios to zram and to inproc, and the CPU the workload and each daemon spent in each\n"
                    "phase.  Needs root.\n\n"
                    "targets:\n"
                    "  zram             a zram device (compresses each page, in RAM); skipped if there is none\n"
                    "  loop             a file in /var/tmp on a loop device with direct I/O\n"
                    "  inproc           vswapfs keeping pages in its own memory (up --host inproc), capacity\n"
                    "                   DEVICE_SIZE\n"
                    "  hoststore        vswapfs with its own hoststore, capacity DEVICE_SIZE: every page admitted\n"
                    "  hoststore-small  vswapfs with a hoststore of SMALL_CAPACITY: the rest goes to the backing\n"
                    "                   file\n\n"
                    "If a swapoff fails (RAM cannot take the pages back), bench stops there, leaves that device\n"
                    "in place and says how to finish.")
    bench.add_argument("--size", type=argtype(page_size), default=parse_size("256M"),
                       help="the workload's memory (default 256M)")
    bench.add_argument("--limit", type=argtype(page_size), default=parse_size("64M"),
                       help="its memory cgroup's limit (default 64M)")
    bench.add_argument("--device-size", type=argtype(page_size), default=parse_size("512M"),
                       help="every target's size, and the store capacity of inproc and hoststore (default 512M)")
    bench.add_argument("--small-capacity", type=argtype(page_size), metavar="SIZE",
                       help="hoststore-small's store capacity, below --size (default: a quarter of --size)")
    bench.add_argument("--targets", type=argtype(benchlib.parse_targets), metavar="LIST",
                       help=f"comma-separated, run in this order, of {','.join(benchlib.TARGETS)} (default: "
                            f"{','.join(benchlib.DEFAULT_TARGETS)}, zram and redis-cluster only where this machine "
                            "has them; floor: the least a pyfuse3 server can do; zram-ALG: zram with that "
                            "algorithm; hoststore-zstd, hoststore-lz4: with --compress)")
    bench.add_argument("--data", choices=benchlib.DATA_KINDS, default="incompressible",
                       help="page contents: incompressible (default; random, no page compresses), "
                            "compressible (one 16-byte pattern per page), json (JSON records with "
                            "Zipf-distributed words: compresses as application data does) or redis (a "
                            "redis-server holding --size of such records, read back through its own memory)")
    bench.add_argument("--runs", type=argtype(benchlib.parse_runs), default=benchlib.MIN_RUNS, metavar="N",
                       help=f"runs per target, at least {benchlib.MIN_RUNS}; medians are reported (default "
                            f"{benchlib.MIN_RUNS})")
    bench.add_argument("--workload-cpu", type=argtype(cpu_number), metavar="CPU",
                       help="keep the workload on this CPU (with --data redis, redis-server and its client "
                            "both; default: wherever the scheduler puts it).  Where "
                            "a workload moves between CPUs, reclaim in its name flushes the other CPUs' TLBs "
                            "by interrupt, which in a VM can cost as much CPU as the swap device itself: "
                            "runs then vary with where it ran (docs/benchmarks.md)")
    bench.add_argument("--json", action="store_true",
                       help="print the report as JSON (progress goes to stderr)")
    bench.add_argument("--chart", type=argtype(benchreport.chart_path), metavar="FILE.png",
                       help="also draw the medians as grouped bars (.png, .svg or .pdf); needs matplotlib: "
                            "pip install 'vswapfs[chart]'")
    bench.set_defaults(func=cmd_bench)
