"""``vswapfs``: mount the swap file, serve it until unmounted."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pyfuse3
import trio

from hoststore.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from hoststore.address import INPROC, Address, parse_store_address
from hoststore.auth import TokenError, load_token
from hoststore.cliutil import argtype, non_negative, percent, positive
from hoststore.hardening import harden
from hoststore import metrics
from hoststore.logsetup import OUTPUT, setup_logging
from hoststore.messages import PAGE_SIZE, MessageError, check_client_name
from hoststore.policy import Limits
from hoststore.pressure import Sampler, parse_source
from hoststore.sizes import parse_size

from . import fusectl
from .backing import Backing, BackingError
from .control import remove_stale, serve_control
from .fs import DISCARD_SUPPORTED, SPLICE_READ_CAN_BE_OFF, Operations
from .hostclient import HostClient
from .inproc import InprocStore
from .pager import Pager

log = logging.getLogger("vswapfs")

DESCRIPTION = """\
Present MOUNTPOINT/swap, a file of the backing file's size whose 4 KiB pages
are offered to a host store; pages the store refuses (or cannot take in time)
go to the backing file before the write is answered.  Attach it as swap with:

  losetup --direct-io=on --find --show MOUNTPOINT/swap   # prints /dev/loopN
  mkswap /dev/loopN && swapon /dev/loopN

MOUNTPOINT/stats holds the counters as JSON.  `vswapctl up` does all of this.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vswapfs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("mountpoint", help="an empty directory to mount on")
    ap.add_argument("--backing", required=True, metavar="FILE",
                    help="backing file on a disk filesystem (created preallocated, mode 0600, if missing)")
    ap.add_argument("--size", type=argtype(parse_size), metavar="SIZE",
                    help="device size when creating the backing file (K/M/G suffixes); "
                         "an existing file's size is used")
    ap.add_argument("--host", type=argtype(parse_store_address), required=True, metavar="ADDR",
                    help="host store address: unix:PATH or tcp:HOST:PORT; or `inproc` to keep admitted pages "
                         "in this process's own memory, under the same admission rules (no store daemon)")
    ap.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                    help="on a unix socket, do not ask the store for shared page memory: every page read "
                         "then travels on the socket (the default reads pages the store holds straight from "
                         "memory it shares with this process alone)")
    inproc = ap.add_argument_group("with --host inproc", "the in-process store's limits, as hoststore's")
    inproc.add_argument("--capacity", type=argtype(parse_size), metavar="SIZE",
                        help="most page data kept in memory (default: the device size)")
    inproc.add_argument("--high-watermark", type=argtype(percent), default=None, metavar="PCT",
                        help="refuse pages once used memory reaches PCT%% of RAM (default 90)")
    inproc.add_argument("--low-watermark", type=argtype(percent), default=None, metavar="PCT",
                        help="after refusing, accept again once used memory falls to PCT%% (default 80)")
    inproc.add_argument("--pressure-source", type=argtype(parse_source), metavar="SOURCE",
                        help="psutil (this machine, the default) or file:PATH (a used-memory "
                                               "percentage read from PATH)")
    ap.add_argument("--name", help="client name at the store (default: HOSTNAME/MACHINE-ID:MOUNTPOINT, unique "
                                   "per device)")
    ap.add_argument("--token-file", metavar="PATH",
                    help="the store's shared token (a file of mode 0600): this end proves it holds it, and "
                         "sends no page to a store that cannot prove the same; needed with --host tcp:... "
                         "(but see --insecure-tcp)")
    ap.add_argument("--insecure-tcp", action="store_true",
                    help="use --host tcp:HOST:PORT without --token-file, on loopback addresses only, giving up "
                         f"what the token proves: {INSECURE_TCP_GIVES_UP}")
    ap.add_argument("--write-timeout", type=argtype(positive), default=1.0, metavar="SECONDS",
                    help="a batch the store has not answered by then goes to the backing file (default 1)")
    ap.add_argument("--pressure-holdoff", type=argtype(non_negative), default=1.0, metavar="SECONDS",
                    help="after the store refuses a whole batch for memory pressure, send batches straight to "
                         "the backing file for this long before offering again: under pressure an offer costs "
                         "both daemons a round trip that ends the same way (default 1; 0 offers every batch)")
    ap.add_argument("--read-timeout", type=argtype(positive), default=30.0, metavar="SECONDS",
                    help="how long a read of a page in the store may wait for the store before "
                         "failing with EIO (default 30)")
    ap.add_argument("--writethrough", action="store_true",
                    help="write every page to the backing file too, before the write is answered; the store "
                         "is then a cache, and losing it loses nothing (default: write-back, a page the "
                         "store accepted lives only there)")
    ap.add_argument("--allow-backing-fs", action="append", default=[], choices=["overlay", "fuse"],
                    help="accept a backing file on this filesystem type, which vswapfs refuses by default "
                         "because it may keep its data in RAM (repeatable)")
    ap.add_argument("--max-tasks", type=int, default=512, metavar="N",
                    help="FUSE requests served at once (default 512): reads waiting for the store must not "
                         "take every worker from swap-out writes")
    ap.add_argument("--max-background", type=int, default=256, metavar="N",
                    help="as root, raise the kernel's limit of asynchronous FUSE requests in flight (swap's "
                         "reads and writes) from 12 to N (default 256; 0 leaves it alone)")
    ap.add_argument("--control", metavar="PATH",
                    help="serve the counters on a unix socket at PATH too, so that tools can read them "
                         "without touching the mount (vswapctl up uses STATE_DIR/vswapfs.sock)")
    ap.add_argument("--metrics", type=argtype(metrics.parse_metrics_address), metavar="[HOST:]PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


async def watch_signals(ops: Operations, mountpoint: str) -> None:
    """Stop on SIGTERM/SIGINT, but never while the swap file is open.

    Stopping then would take away pages that live swap still needs: every
    process with pages on the device would get SIGBUS or hang.  The stop is an
    ordinary unmount, run beside the FUSE loop: the kernel refuses it (EBUSY) if
    anything opened the file meanwhile, so there is no window between checking
    and stopping; once it succeeds the FUSE loop ends by itself."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if ops.swap_opens:
                log.warning("%s ignored: the swap file is still open (swapoff and losetup -d it first, "
                            "or run `vswapctl down`)", name)
                continue
            log.info("%s: unmounting", name)
            argv = ["umount", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-u", mountpoint]
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60))
            if done.returncode:
                log.warning("%s ignored: %s", name, (done.stderr or done.stdout).strip() or "unmount refused")
                continue
            return


async def raise_background_limit(mountpoint: str, max_background: int) -> None:
    """Once the mount is up, let the kernel keep more swap requests in flight."""
    if max_background <= 0:
        return
    if os.geteuid() != 0:
        log.warning("not root: the kernel's limit of %d asynchronous FUSE requests stays (--max-background)",
                    12)
        return
    try:
        connection = fusectl.connection_of(mountpoint)
        if connection is None:
            raise OSError(f"no FUSE mount at {mountpoint} in /proc/self/mountinfo")
        await trio.to_thread.run_sync(fusectl.set_limits_mounted, connection, max_background,
                                      max_background * 3 // 4)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot raise the FUSE background limit to %d (%s): reads waiting for the store may "
                    "hold up swap-out writes", max_background, exc)
        return
    log.info("FUSE connection %d: max_background %d", connection, max_background)


StoreClient = HostClient | InprocStore


async def serve(ops: Operations, pager: Pager, client: StoreClient, args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        nursery.start_soon(pager.drop_orphans)
        nursery.start_soon(watch_signals, ops, args.mountpoint)
        if args.control:
            await nursery.start(serve_control, args.control, ops.stats)
        if args.metrics_snapshot is not None:
            nursery.start_soon(metrics.publish_forever, args.metrics_snapshot, ops.stats)
        nursery.start_soon(raise_background_limit, args.mountpoint, args.max_background)
        await pyfuse3.main(min_tasks=4, max_tasks=args.max_tasks)
        await pager.release_all()
        nursery.cancel_scope.cancel()


def combined_stats(pager: Pager, client: StoreClient, ops: Operations, unhardened: list[str]) -> dict[str, Any]:
    stats = pager.stats()
    stats["pressure_risks"] = pager.backing.pressure_risks + unhardened
    if getattr(ops, "splice_read", None) is True and SPLICE_READ_CAN_BE_OFF:  # libfuse would not be told
        stats["pressure_risks"].append("FUSE requests are read with splice(2): the kernel allocates for each")
    stats["log_lines_dropped"] = OUTPUT.dropped
    if isinstance(client, InprocStore):
        stats["inproc_store"] = client.stats()  # its counters share names with the pager's: kept apart
    else:
        stats.update(client.counters.as_dict())
    stats["host_address"] = str(client.address)
    stats["shared_memory"] = isinstance(client, InprocStore) or client.sharing
    stats["backing_file"] = pager.backing.path
    stats["pid"] = os.getpid()
    stats["swap_opens"] = ops.swap_opens
    stats["discard_supported"] = DISCARD_SUPPORTED
    stats["fuse_splice_read"] = getattr(ops, "splice_read", True)  # negotiated at init (the patch says)
    return stats


def machine_id(paths: tuple[str, ...] = ("/etc/machine-id", "/var/lib/dbus/machine-id")) -> str:
    """This machine's id (systemd's, unique per installation), or "" where there is none."""
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text:
            return text[:32]
    return ""


def default_name(mountpoint: str) -> str:
    """HOSTNAME/MACHINE-ID:MOUNTPOINT: cloned VMs share a hostname, and often a
    mountpoint, but not a machine id.  Shortened with a hash where too long."""
    host, mid = socket.gethostname(), machine_id()
    who = f"{host}/{mid[:12]}" if mid else host
    name = f"{who}:{os.path.realpath(mountpoint)}"
    try:
        return check_client_name(name)
    except MessageError:
        digest = hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:24]
        return f"{who[:64]}:{digest}"


def check_mountpoint(path: str) -> str | None:
    if not os.path.isdir(path):
        return f"mountpoint {path} is not a directory"
    if os.path.ismount(path):
        return f"{path} is already a mount point"
    if os.listdir(path):
        return f"mountpoint {path} is not empty"
    return None


INPROC_OPTIONS = ("capacity", "high_watermark", "low_watermark", "pressure_source")


def check_inproc_options(args: argparse.Namespace, inproc: bool) -> str | None:
    """The in-process store's options mean nothing with a store elsewhere: say so rather than ignore them."""
    if inproc:
        if args.token_file:
            return "--token-file is for a store at an address; --host inproc has none"
        high = args.high_watermark if args.high_watermark is not None else 90.0
        low = args.low_watermark if args.low_watermark is not None else min(80.0, high)
        if low > high:
            return f"--low-watermark {low} is above --high-watermark {high}"
        if args.capacity is not None and args.capacity % PAGE_SIZE:
            return f"--capacity {args.capacity} is not a multiple of {PAGE_SIZE}"
        args.high_watermark, args.low_watermark = high, low
        return None
    given = [name for name in INPROC_OPTIONS if getattr(args, name) is not None]
    if given:
        return f"--{given[0].replace('_', '-')} is for --host inproc; a store daemon has its own limits"
    return None


def inproc_store(args: argparse.Namespace, name: str, device_size: int) -> InprocStore:
    capacity = args.capacity if args.capacity is not None else device_size
    limits = Limits(high_percent=args.high_watermark, low_percent=args.low_watermark,
                    capacity_pages=capacity // PAGE_SIZE)
    sampler = Sampler(source=args.pressure_source or parse_source("psutil"))
    return InprocStore(name, device_size, limits, sampler)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.size is not None and (args.size <= 0 or args.size % 4096):
        ap.error(f"--size {args.size} is not a positive multiple of 4096")
    if args.max_tasks < 1:
        ap.error("--max-tasks must be at least 1")
    if args.name is not None:
        try:
            check_client_name(args.name)
        except MessageError as exc:
            ap.error(f"--name: {exc}")
    problem = check_mountpoint(args.mountpoint)
    if problem:
        ap.error(problem)
    # Resolved now, before the mount: once mounted, a stat of it (realpath does one) would
    # ask this very process, which would then wait for itself.
    args.mountpoint = os.path.realpath(args.mountpoint)
    if args.control:
        args.control = os.path.abspath(args.control)
        if os.path.realpath(os.path.dirname(args.control)).startswith(args.mountpoint.rstrip("/") + "/") or \
                os.path.realpath(os.path.dirname(args.control)) == args.mountpoint:
            ap.error(f"--control {args.control} is inside the mount point")
    inproc = args.host.kind == INPROC
    problem = check_inproc_options(args, inproc) or check_tcp_options([args.host], bool(args.token_file),
                                                                      args.insecure_tcp)
    if problem:
        ap.error(problem)
    token = None
    if args.token_file:
        try:
            token = load_token(args.token_file)
        except TokenError as exc:
            print(f"vswapfs: error: {exc}", file=sys.stderr)
            return 1
    setup_logging(args.verbose, "vswapfs")
    OUTPUT.start()  # from here on, nothing waits for the log file
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        print("vswapfs: error: cannot mount: /dev/fuse is not open to this user (run as root, or make /dev/fuse "
              "accessible and install fusermount3)", file=sys.stderr)
        return 1
    if args.control:
        try:
            remove_stale(args.control)
        except OSError as exc:
            print(f"vswapfs: error: --control {args.control}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        backing = Backing.open(args.backing, args.size, args.mountpoint, frozenset(args.allow_backing_fs))
    except BackingError as exc:
        print(f"vswapfs: error: {exc}", file=sys.stderr)
        return 1
    name = args.name or default_name(args.mountpoint)
    address: Address = args.host
    client: StoreClient
    if inproc:
        client = inproc_store(args, name, backing.size)
    else:
        client = HostClient(address, name, backing.size, token=token, share=args.shared_memory,
                            insecure_tcp=args.insecure_tcp)
    pager = Pager(backing, client, write_timeout=args.write_timeout, read_timeout=args.read_timeout,
                  writethrough=args.writethrough, pressure_holdoff=args.pressure_holdoff)
    ops = Operations(pager)
    unhardened = harden(log)
    if not SPLICE_READ_CAN_BE_OFF:
        unhardened.append("pyfuse3 without the splice patch: each FUSE request read makes the kernel allocate "
                          "(install pyfuse3 with tools/bootstrap.sh)")
        log.warning("not safe under machine-wide memory pressure: %s", unhardened[-1])
    ops.stats = lambda: combined_stats(pager, client, ops, unhardened)
    for risk in backing.pressure_risks:
        log.warning("not safe under machine-wide memory pressure: %s", risk)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal must not take the swap device with it
    if not DISCARD_SUPPORTED:
        log.warning("this pyfuse3 has no fallocate handler: discard is unavailable, so freed swap slots "
                    "stay in the store (install pyfuse3 with tools/bootstrap.sh to get it)")
    args.metrics_snapshot = None
    if args.metrics:  # before the mount: a port in use must not leave a mount behind
        try:
            args.metrics_snapshot = metrics.start(args.metrics, metrics.pager_families)
        except OSError as exc:
            backing.close()
            print(f"vswapfs: error: --metrics {args.metrics[0]}:{args.metrics[1]}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    options = set(pyfuse3.default_options)
    options |= {"fsname=vswapfs", "subtype=vswapfs"}
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except (RuntimeError, OSError) as exc:
        backing.close()
        print(f"vswapfs: error: cannot mount on {args.mountpoint} ({exc}): FUSE needs root, or /dev/fuse open to "
              "you and fusermount3", file=sys.stderr)
        return 1
    log.info("serving %s/swap (%d bytes, %s), backing %s, host store %s", args.mountpoint, backing.size,
             "write-through" if args.writethrough else "write-back", backing.path, address)
    try:
        trio.run(serve, ops, pager, client, args)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    else:
        pyfuse3.close()
    finally:
        backing.close()
        if isinstance(client, InprocStore):
            client.close()
    log.info("unmounted %s", args.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
