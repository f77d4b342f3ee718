"""vswapfs's command line: its options, and the checks that need more than one of them."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from typing import Any

from pagewire.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from pagewire.address import INPROC, parse_store_address
from pagewire.codec import add_compress_arguments, recompress_problem
from pagewire.messages import MessageError, check_client_name
from vswapcommon import metrics
from vswapcommon.cliutil import argtype, non_negative, percent, positive
from vswapcommon.sizes import PAGE_SIZE, parse_size

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
    _add_device_arguments(ap)
    add_inproc_arguments(ap)
    add_identity_arguments(ap)
    _add_paging_arguments(ap)
    _add_serving_arguments(ap)
    return ap


def _add_device_arguments(ap: argparse.ArgumentParser) -> None:
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


def _pressure_source(text: str) -> Any:
    """A pressure source for the in-process store (parsed where the store lives)."""
    from .inproc import parse_pressure_source  # the store's package loads only for --host inproc

    return parse_pressure_source(text)


def add_inproc_arguments(ap: argparse.ArgumentParser) -> None:
    inproc = ap.add_argument_group("with --host inproc", "the in-process store's limits, as hoststore's")
    inproc.add_argument("--capacity", type=argtype(parse_size), metavar="SIZE",
                        help="most page data kept in memory (default: the device size)")
    add_compress_arguments(inproc, compress_default=None)
    inproc.add_argument("--high-watermark", type=argtype(percent), default=None, metavar="PCT",
                        help="refuse pages once used memory reaches PCT%% of RAM (default 90)")
    inproc.add_argument("--low-watermark", type=argtype(percent), default=None, metavar="PCT",
                        help="after refusing, accept again once used memory falls to PCT%% (default 80)")
    inproc.add_argument("--pressure-source", type=argtype(_pressure_source), metavar="SOURCE",
                        help="psutil (this machine, the default) or file:PATH (a used-memory "
                                               "percentage read from PATH)")


def add_identity_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--name", help="client name at the store (default: HOSTNAME/MACHINE-ID:MOUNTPOINT, unique "
                                   "per device)")
    ap.add_argument("--token-file", metavar="PATH",
                    help="the store's shared token (a file of mode 0600): this end proves it holds it, and "
                         "sends no page to a store that cannot prove the same; needed with --host tcp:... "
                         "(but see --insecure-tcp)")
    ap.add_argument("--insecure-tcp", action="store_true",
                    help="use --host tcp:HOST:PORT without --token-file, on loopback addresses only, giving up "
                         f"what the token proves: {INSECURE_TCP_GIVES_UP}")


def _add_paging_arguments(ap: argparse.ArgumentParser) -> None:
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


def _add_serving_arguments(ap: argparse.ArgumentParser) -> None:
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


INPROC_OPTIONS = ("capacity", "compress", "recompress_after", "recompress_rate", "recompress_dictionary",
                  "high_watermark", "low_watermark", "pressure_source")


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
        problem = recompress_problem(args)
        if problem:
            return problem
        args.high_watermark, args.low_watermark = high, low
        return None
    given = [name for name in INPROC_OPTIONS if getattr(args, name) is not None]
    if given:
        return f"--{given[0].replace('_', '-')} is for --host inproc; a store daemon has its own limits"
    return None


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no I/O beyond a look at the mount point; ``ap.error`` on the first problem.
    Resolves the mount point and the control socket's path on the way."""
    if args.size is not None and (args.size <= 0 or args.size % PAGE_SIZE):
        ap.error(f"--size {args.size} is not a positive multiple of {PAGE_SIZE}")
    check_tasks_and_name(ap, args)
    problem = check_mountpoint(args.mountpoint)
    if problem:
        ap.error(problem)
    # Resolved now, before the mount: once mounted, a stat of it (realpath does one) would
    # ask this very process, which would then wait for itself.
    args.mountpoint = os.path.realpath(args.mountpoint)
    check_control_and_store(ap, args)


def check_tasks_and_name(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_tasks < 1:
        ap.error("--max-tasks must be at least 1")
    if args.name is not None:
        try:
            check_client_name(args.name)
        except MessageError as exc:
            ap.error(f"--name: {exc}")


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both resolved)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_control_and_store(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The control socket outside the (resolved) mount point, and the store's options as
    the kind of store allows; ``ap.error`` on the first problem."""
    if args.control:
        args.control = os.path.abspath(args.control)
        if inside(os.path.realpath(os.path.dirname(args.control)), args.mountpoint):
            ap.error(f"--control {args.control} is inside the mount point")
    problem = check_inproc_options(args, args.host.kind == INPROC) or check_tcp_options(
        [args.host], bool(args.token_file), args.insecure_tcp)
    if problem:
        ap.error(problem)
