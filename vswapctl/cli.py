"""``vswapctl``: bring a vswapfs swap device up and down, and look inside it."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import trio

from hoststore.address import parse_address
from hoststore.cliutil import argtype
from hoststore.messages import PAGE_SIZE, Drain, Stats
from hoststore.sizes import format_size, parse_size

from . import system
from .state import DEFAULT_STATE_DIR, State

DEFAULT_BACKING = "/var/lib/vswapfs/backing"
READY_TIMEOUT = 20.0


class UpFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"vswapctl: {message}", flush=True)


# -- up -----------------------------------------------------------------------------


def _spawn(argv: list[str], log_path: str) -> int:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path) as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:])
    except OSError:
        return ""


def _wait(ready: Any, pid: int, what: str, log_path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if not system.alive(pid):
            raise UpFailed(f"{what} exited during start-up: {_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise UpFailed(f"{what} not ready after {READY_TIMEOUT:.0f}s: {_log_tail(log_path)}")
        time.sleep(0.05)


def _socket_ready(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def start_hoststore(state: State, args: argparse.Namespace) -> None:
    argv = [sys.executable, "-m", "hoststore", "--listen", f"unix:{state.socket}", "--capacity", str(args.capacity)]
    if args.pressure_source:
        argv += ["--pressure-source", args.pressure_source]
    if args.verbose:
        argv.append("-v")
    state.hoststore_pid = _spawn(argv, state.log("hoststore"))
    state.host = f"unix:{state.socket}"
    state.save()
    _wait(lambda: _socket_ready(state.socket), state.hoststore_pid, "hoststore", state.log("hoststore"))
    say(f"hoststore pid {state.hoststore_pid} on {state.host}, capacity {format_size(args.capacity)}")


def start_vswapfs(state: State, args: argparse.Namespace) -> None:
    if not os.path.isdir(state.mountpoint):
        os.makedirs(state.mountpoint, mode=0o700)
        state.created_mountpoint = True
    argv = [sys.executable, "-m", "vswapfs", state.mountpoint, "--backing", state.backing, "--host", state.host]
    if args.size:
        argv += ["--size", str(args.size)]
    if args.writethrough:
        argv.append("--writethrough")
    if args.verbose:
        argv.append("-v")
    state.vswapfs_pid = _spawn(argv, state.log("vswapfs"))
    state.save()
    _wait(lambda: system.mount_type(state.mountpoint) == "fuse.vswapfs", state.vswapfs_pid, "vswapfs",
          state.log("vswapfs"))
    state.size = os.stat(state.swapfile).st_size
    say(f"vswapfs pid {state.vswapfs_pid} serving {state.swapfile} ({format_size(state.size)}), "
        f"backing {state.backing}")
    deadline = time.monotonic() + 3
    while not (read_vswapfs_stats(state) or {}).get("host_connected"):
        if time.monotonic() > deadline:
            say(f"warning: vswapfs is not connected to the host store at {state.host}; pages go to the "
                f"backing file until it is (see {state.log('vswapfs')})")
            break
        time.sleep(0.05)


def attach_swap(state: State, args: argparse.Namespace) -> None:
    loop = system.run(["losetup", "--direct-io=on", "--find", "--show", state.swapfile]).strip()
    if not loop.startswith("/dev/loop"):
        raise UpFailed(f"losetup printed {loop!r}, not a loop device")
    state.loop = loop
    state.save()
    if not system.loop_dio(loop):
        say(f"warning: {loop} does not use direct I/O; swap pages will pass through the page cache")
    system.run(["mkswap", loop])
    options = ["--priority", str(args.priority)] if args.priority is not None else []
    if args.discard:
        if (read_vswapfs_stats(state) or {}).get("discard_supported"):
            options.append("--discard=pages")
        else:
            say("warning: this vswapfs cannot take discards (unpatched pyfuse3): swapping on without discard")
    state.swapon_options = options
    system.run(["swapon", *options, loop])
    state.save()
    say(f"swap on {loop} ({format_size(state.size)}, direct I/O {'on' if system.loop_dio(loop) else 'off'}, "
        f"discard {'on' if '--discard=pages' in options else 'off'})")


def cmd_up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return _fail("up needs root (FUSE mount, loop device, swapon)")
    old = State.load(args.state_dir)
    if old is not None:
        return _fail(f"a device is already up (state in {old.path}); run `vswapctl down` first")
    if args.size is None and not os.path.exists(args.backing):
        return _fail(f"--size is needed to create the backing file {args.backing}")
    state = State(args.state_dir, mountpoint=os.path.abspath(args.mountpoint or os.path.join(args.state_dir, "mnt")),
                  backing=os.path.abspath(args.backing))
    state.save()
    os.makedirs(os.path.dirname(state.backing), exist_ok=True)
    try:
        if args.host:
            state.host = str(args.host)
        else:
            start_hoststore(state, args)
        start_vswapfs(state, args)
        attach_swap(state, args)
    except (UpFailed, system.CommandFailed, OSError) as exc:
        say(f"error: {exc}")
        say("undoing what was set up:")
        teardown(state)
        return 1
    except BaseException:  # a bug or ^C: still leave nothing behind
        say("interrupted; undoing what was set up:")
        teardown(state)
        raise
    say(f"up: `cat /proc/swaps` lists {state.loop}; `vswapctl status` shows where pages live")
    return 0


# -- down ---------------------------------------------------------------------------


def teardown(state: State) -> list[str]:
    """swapoff -> losetup -d -> unmount -> stop daemons, each step attempted whatever
    failed before; says what it did."""
    done: list[str] = []

    def step(message: str) -> None:
        done.append(message)
        say(message)

    loops = sorted(set(filter(None, [state.loop])) | set(system.loops_for(state.swapfile)))
    active = system.swaps()
    for loop in loops:
        if loop in active:
            try:
                system.run(["swapoff", loop], timeout=1800)
                step(f"swapoff {loop}")
            except system.CommandFailed as exc:
                step(f"swapoff {loop} FAILED: {exc}")
        if loop in system.loops_for(state.swapfile) or loop == state.loop:
            try:
                system.run(["losetup", "-d", loop])
                step(f"detached {loop}")
            except system.CommandFailed as exc:
                step(f"losetup -d {loop} FAILED: {exc}")
    _unmount(state, step)
    if state.hoststore_pid:
        step(f"hoststore pid {state.hoststore_pid}: {system.stop(state.hoststore_pid)}")
    if state.created_mountpoint:
        try:
            os.rmdir(state.mountpoint)
        except OSError:
            pass
    state.remove()
    return done


def _unmount(state: State, step: Any) -> None:
    mounted = system.mount_type(state.mountpoint) is not None
    vswapfs_alive = system.alive(state.vswapfs_pid)
    if mounted and vswapfs_alive:
        try:
            system.run(["umount", state.mountpoint])
            step(f"unmounted {state.mountpoint}")
        except system.CommandFailed as exc:
            step(f"umount FAILED ({exc}); lazy unmount instead")
            system.run(["umount", "-l", state.mountpoint])
        if system.wait_gone(state.vswapfs_pid, 15):
            step(f"vswapfs pid {state.vswapfs_pid} exited")
            return
    elif mounted:
        system.run(["umount", "-l", state.mountpoint])
        step(f"lazily unmounted {state.mountpoint} (vswapfs pid {state.vswapfs_pid} had died)")
    if state.vswapfs_pid and system.alive(state.vswapfs_pid):
        step(f"vswapfs pid {state.vswapfs_pid}: {system.stop(state.vswapfs_pid)}")


def cmd_down(args: argparse.Namespace) -> int:
    state = State.load(args.state_dir)
    if state is None:
        say(f"nothing to take down (no state in {args.state_dir})")
        return 0
    done = teardown(state)
    failed = [d for d in done if "FAILED" in d]
    say("down" if not failed else f"down, with {len(failed)} failure(s)")
    return 1 if failed else 0


# -- status and stats ----------------------------------------------------------------


def _need_state(args: argparse.Namespace) -> State:
    state = State.load(args.state_dir)
    if state is None:
        raise SystemExit(f"vswapctl: error: no device is up (no state in {args.state_dir})")
    return state


def read_vswapfs_stats(state: State) -> dict[str, Any] | None:
    if system.mount_type(state.mountpoint) != "fuse.vswapfs":
        return None
    try:
        with open(state.statsfile) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_host_stats(address: str) -> dict[str, Any] | str:
    from vswapfs.hostclient import StoreError, StoreUnavailable, query

    try:
        return trio.run(query, parse_address(address), Stats())
    except (StoreUnavailable, StoreError, OSError, ValueError) as exc:
        return f"unreachable: {exc}"


def cmd_status(args: argparse.Namespace) -> int:
    state = _need_state(args)
    fs = read_vswapfs_stats(state)
    swap = system.swaps().get(state.loop)
    status: dict[str, Any] = {
        "loop": state.loop or None,
        "direct_io": system.loop_dio(state.loop) if state.loop else None,
        "swap": swap,
        "mountpoint": state.mountpoint,
        "vswapfs_pid": state.vswapfs_pid,
        "vswapfs_running": system.alive(state.vswapfs_pid),
        "host": state.host,
        "hoststore_pid": state.hoststore_pid or None,
        "hoststore_running": system.alive(state.hoststore_pid) if state.hoststore_pid else None,
        "backing": state.backing,
        "pages": None if fs is None else {k: fs[f"pages_{k}"] for k in ("host", "backing", "unwritten")},
        "host_connected": None if fs is None else fs["host_connected"],
    }
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    dev = state.loop or "(none)"
    if swap:
        dev += f"  swap on, priority {swap['priority']}, used {format_size(swap['used_kib'] * 1024)} " \
               f"of {format_size(swap['size_kib'] * 1024)}"
    dev += f"  direct I/O {'on' if status['direct_io'] else 'off'}" if state.loop else ""
    rows = [
        ("device", dev),
        ("vswapfs", f"pid {state.vswapfs_pid} {'running' if status['vswapfs_running'] else 'NOT RUNNING'}"
                    f", {state.mountpoint}"),
        ("host store", f"{state.host}" + (f" (pid {state.hoststore_pid} "
                        f"{'running' if status['hoststore_running'] else 'NOT RUNNING'})" if state.hoststore_pid
                        else " (external)") + ("" if fs is None else
                        ", connected" if fs["host_connected"] else ", NOT CONNECTED")),
        ("backing", state.backing),
    ]
    if fs is not None:
        pages = status["pages"]
        rows.append(("pages", "  ".join(f"{k} {v} ({format_size(v * PAGE_SIZE)})" if k != "unwritten"
                                         else f"never written {v}" for k, v in pages.items())))
    _table(rows)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    state = _need_state(args)
    fs = read_vswapfs_stats(state)
    host = read_host_stats(state.host)
    if args.json:
        print(json.dumps({"vswapfs": fs, "hoststore": host}, indent=1, sort_keys=True))
        return 0
    print("vswapfs" + ("" if fs is not None else ": not mounted"))
    if fs is not None:
        _table(sorted(_flatten(fs)), indent="  ")
    print("hoststore" + (f": {host}" if isinstance(host, str) else ""))
    if isinstance(host, dict):
        _table(sorted(_flatten(host)), indent="  ")
    return 0


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(rows: list[tuple[str, Any]], indent: str = "") -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{indent}{key:<{width}}  {value}")


# -- drain --------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    """Ask a hoststore to hand every page back to its clients and exit."""
    from vswapfs.hostclient import StoreError, StoreUnavailable, query

    if args.host is not None:
        address = args.host
    else:
        state = _need_state(args)
        address = parse_address(state.host)
    say(f"draining the host store at {address}: it hands every page back to its clients, then exits")
    try:
        report = trio.run(query, address, Drain(), args.timeout)
    except (StoreUnavailable, StoreError, OSError) as exc:
        return _fail(f"drain of {address} failed: {exc}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    handed = sum(report.get("handed_back", {}).values())
    dropped = report.get("dropped", {})
    say(f"handed back {handed} pages ({format_size(handed * PAGE_SIZE)})")
    for name, pages in sorted(dropped.items()):
        say(f"DROPPED: client {name!r} did not take back {pages} pages ({format_size(pages * PAGE_SIZE)})")
    return 1 if dropped else 0


# -- microbench ---------------------------------------------------------------------


def cmd_microbench(args: argparse.Namespace) -> int:
    from . import microbench

    report = microbench.run(args.seconds)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"page path through a hoststore on a unix socket ({args.seconds}s per measurement); "
          "checksum: XXH3 per page, its share of the time per page")
    rows = [["batch", "write pages/s", "read pages/s", "checksum write", "checksum read"]]
    for batch in microbench.BATCHES:
        e = report[str(batch)]
        rows.append([str(batch), str(e["write_pages_per_s"]), str(e["read_pages_per_s"]),
                     f"{e['checksum_write_us_per_page']:.2f} us ({e['checksum_share_of_write']:.1%})",
                     f"{e['checksum_read_us_per_page']:.2f} us ({e['checksum_share_of_read']:.1%})"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    print(f"1-page read: p50 {report['1']['read_p50_us']} us, p99 {report['1']['read_p99_us']} us")
    return 0


# -- faults -------------------------------------------------------------------------


def cmd_faults(args: argparse.Namespace) -> int:
    from . import faults

    if os.geteuid() != 0:
        return _fail("faults needs root (it mounts a vswapfs)")
    if args.rounds < 1 or args.pages < 256:
        return _fail("--rounds must be at least 1 and --pages at least 256")
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


# -- workload -----------------------------------------------------------------------


def cmd_workload(args: argparse.Namespace) -> int:
    from . import cgroup

    try:
        cg = cgroup.create(f"vswapctl-workload-{os.getpid()}", args.limit)
    except cgroup.CgroupUnavailable as exc:
        return _fail(str(exc))
    try:
        argv = [sys.executable, "-m", "vswapctl.workload", "--size", str(args.size), "--passes", str(args.passes)]
        done = cg.run(argv)
    finally:
        cg.remove()
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode < 0:
        return _fail(f"workload killed by signal {-done.returncode} (OOM? is swap on and large enough?)")
    return done.returncode


# -- bench --------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, cgroup

    if os.geteuid() != 0:
        return _fail("bench needs root (swap devices, memory cgroup)")
    if args.runs < 1:
        return _fail("--runs must be at least 1")
    try:
        report = bench.bench(args.size, args.limit, args.runs, args.device_size, args.capacity, args.baseline,
                             say=(lambda m: None) if args.json else say)
    except (bench.BenchError, cgroup.CgroupUnavailable, system.CommandFailed) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    base = None if args.baseline == "none" else args.baseline
    header = ["phase (median seconds)", "vswapfs"] + ([base, "ratio"] if base else [])
    rows = [header]
    for phase in bench.PHASES:
        row = [phase, f"{report['vswapfs'][phase]:.3f}"]
        if base:
            row += [f"{report[base][phase]:.3f}", f"{report['ratio_vs_' + base][phase]}x"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    return 0


# -- command line -------------------------------------------------------------------


def _fail(message: str) -> int:
    print(f"vswapctl: error: {message}", file=sys.stderr)
    return 1


def _page_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{text} is not a positive multiple of {PAGE_SIZE} bytes")
    return size


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vswapctl",
        description="Bring a vswapfs swap device up and down, and look inside it.",
        epilog="typical use: vswapctl up --size 1G; vswapctl status; vswapctl stats; vswapctl down",
    )
    ap.add_argument("--state-dir", default=os.environ.get("VSWAPFS_STATE_DIR", DEFAULT_STATE_DIR),
                    help=f"where up keeps its state, socket and logs (default {DEFAULT_STATE_DIR}, "
                         "or $VSWAPFS_STATE_DIR); one device per state dir")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the daemons, attach a loop device, mkswap and swapon",
                        description="Start a hoststore (unless --host), mount vswapfs, attach a loop device "
                                    "with direct I/O, mkswap and swapon it.")
    up.add_argument("--size", type=argtype(_page_size), help="device size (K/M/G); needed unless the backing "
                                                           "file exists")
    up.add_argument("--host", type=argtype(parse_address), metavar="ADDR",
                    help="use a running hoststore (unix:PATH or tcp:HOST:PORT) instead of starting one")
    up.add_argument("--backing", default=DEFAULT_BACKING, metavar="FILE",
                    help=f"backing file on a disk filesystem (default {DEFAULT_BACKING})")
    up.add_argument("--mountpoint", metavar="DIR", help="where to mount vswapfs (default STATE_DIR/mnt)")
    up.add_argument("--capacity", type=argtype(_page_size), metavar="SIZE",
                    help="capacity of the hoststore that up starts (default: the device size)")
    up.add_argument("--writethrough", action="store_true",
                    help="vswapfs writes every page to the backing file too: losing the store loses nothing "
                         "(default: write-back)")
    up.add_argument("--pressure-source", metavar="SOURCE",
                    help="the started hoststore's pressure source: psutil (default) or file:PATH, a used-memory "
                         "percentage read from PATH (to steer hand-back in experiments and tests)")
    up.add_argument("--priority", type=int, metavar="N", help="swap priority (swapon --priority)")
    up.add_argument("--no-discard", dest="discard", action="store_false",
                    help="do not swapon with --discard=pages (freed swap slots then stay in the store "
                         "until rewritten)")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging in the daemons' logs")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="swapoff, losetup -d, unmount, stop what up started",
                          description="Undo `up`, also after a run whose daemons died.")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="the device, the daemons, and where the pages live")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    stats = sub.add_parser("stats", help="both daemons' counters")
    stats.add_argument("--json", action="store_true", help="machine-readable")
    stats.set_defaults(func=cmd_stats)

    drain = sub.add_parser("drain", help="make the host store hand every page back and exit",
                           description="Ask the host store (the one `up` started, or --host) to stop admitting "
                                       "pages, hand every page back to its clients (they write them to their "
                                       "backing files), and exit.  A planned restart of the store loses "
                                       "nothing this way; SIGTERM does the same.")
    drain.add_argument("--host", type=argtype(parse_address), metavar="ADDR",
                       help="the store's address (default: the one in the state directory)")
    drain.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long to wait for the drain to finish (default 600)")
    drain.add_argument("--json", action="store_true", help="print the store's report as JSON")
    drain.set_defaults(func=cmd_drain)

    mb = sub.add_parser("microbench", help="the page path without the kernel: pages/s per batch size",
                        description="Write and read batches of 1, 8, 64 and 256 pages through the pager and a "
                                    "hoststore process on a unix socket (no FUSE, no swap); report pages per "
                                    "second, 1-page read latency and the per-page cost of the integrity check.")
    mb.add_argument("--seconds", type=float, default=1.0, help="per measurement (default 1)")
    mb.add_argument("--json", action="store_true")
    mb.set_defaults(func=cmd_microbench)

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

    work = sub.add_parser("workload", help="run a verifying workload in a memory cgroup",
                          description="Fill SIZE of memory with per-page patterns inside a memory cgroup "
                                      "limited to LIMIT, read it all back and verify every page.")
    work.add_argument("--size", type=argtype(_page_size), default=parse_size("256M"))
    work.add_argument("--limit", type=argtype(_page_size), default=parse_size("64M"))
    work.add_argument("--passes", type=int, default=2)
    work.set_defaults(func=cmd_workload)

    bench = sub.add_parser("bench", help="the workload through vswapfs vs a baseline swap device",
                           description="Run the verifying workload RUNS times through a fresh vswapfs device "
                                       "and through a baseline device (zram, or a loop device on a disk file), "
                                       "interleaved, and report median fill (swap-out), sequential and random "
                                       "verify (swap-in) times and their ratios to the baseline.")
    bench.add_argument("--size", type=argtype(_page_size), default=parse_size("256M"), help="workload size")
    bench.add_argument("--limit", type=argtype(_page_size), default=parse_size("64M"), help="its memory cgroup limit")
    bench.add_argument("--device-size", type=argtype(_page_size), default=parse_size("512M"))
    bench.add_argument("--capacity", type=argtype(_page_size), default=parse_size("512M"),
                       help="store capacity (default: all pages fit; lower it to bench the backing path)")
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--baseline", choices=["zram", "loop", "none"], default="zram")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "capacity", None) is None and args.command == "up":
        args.capacity = args.size or (os.path.getsize(args.backing) if os.path.exists(args.backing) else 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
