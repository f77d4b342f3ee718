"""fscache's command line: its options, and the checks that need more than one of them."""

from __future__ import annotations

import argparse
import os

from pagewire.address import parse_store_address
from vswapcommon import metrics
from vswapcommon.cliutil import argtype, positive
from vswapcommon.sizes import PAGE_SIZE, parse_size
from vswapfs.options import (add_identity_arguments, add_inproc_arguments, check_control_and_store, check_mountpoint,
                             check_tasks_and_name, inside)

DEFAULT_SIZE = "1G"

DESCRIPTION = """\
Present the directory tree LOWER at MOUNTPOINT.  Everything passes through to
LOWER; whole pages of file data read from LOWER are offered to a host store as
clean, droppable pages (an ephemeral pool), and later reads the kernel's own page
cache cannot answer are served from the store when it still has the page, checked
by version and checksum, else from LOWER.  Writes, truncates, unlinks and renames
through the mount forget what they touch before they are answered; a file changed
in LOWER behind the mount's back is forgotten at its next open.  LOWER is read
around its own page cache (O_DIRECT, or posix_fadvise DONTNEED), so a page is kept
at most once on this machine beside the mount's page cache.

`vswapctl cache up` does all of this, with a store of its own unless told one;
`vswapctl cache down` takes it down.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fscache", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lower", metavar="LOWER", help="the directory whose tree the mount presents")
    ap.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    ap.add_argument("--host", type=argtype(parse_store_address), required=True, metavar="ADDR",
                    help="host store address: unix:PATH or tcp:HOST:PORT; or `inproc` to keep the pages in this "
                         "process's own memory, under the same admission rules (no store daemon)")
    ap.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                    help="on a unix socket, do not ask the store for shared page memory (every cached page "
                         "then travels on the socket)")
    ap.add_argument("--size", type=argtype(parse_size), default=parse_size(DEFAULT_SIZE), metavar="SIZE",
                    help="how much file data the cache can keep track of at once: the size of its device in "
                         f"the store, and so the most the store can hold for it (default {DEFAULT_SIZE}; the "
                         "cache's own bookkeeping costs some 40 bytes per 4 KiB of it)")
    ap.add_argument("--store-timeout", type=argtype(positive), default=1.0, metavar="SECONDS",
                    help="how long a read waits for the store before reading LOWER instead (default 1)")
    add_inproc_arguments(ap)
    add_identity_arguments(ap)
    ap.add_argument("--control", metavar="PATH",
                    help="serve the counters on a unix socket at PATH (vswapctl cache up uses "
                         "STATE_DIR/cache/fscache.sock)")
    ap.add_argument("--metrics", type=argtype(metrics.parse_metrics_address), metavar="[HOST:]PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)")
    ap.add_argument("--max-tasks", type=int, default=64, metavar="N", help="FUSE requests served at once "
                                                                          "(default 64)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no I/O beyond a look at LOWER and the mount point; ``ap.error``
    on the first problem.  Resolves both paths (before the mount: a stat of the mount point
    afterwards would ask this very process)."""
    if args.size <= 0 or args.size % PAGE_SIZE:
        ap.error(f"--size {args.size} is not a positive multiple of {PAGE_SIZE}")
    check_tasks_and_name(ap, args)
    if not os.path.isdir(args.lower):
        ap.error(f"LOWER {args.lower} is not a directory")
    problem = check_mountpoint(args.mountpoint)
    if problem:
        ap.error(problem)
    args.lower = os.path.realpath(args.lower)
    args.mountpoint = os.path.realpath(args.mountpoint)
    if inside(args.mountpoint, args.lower) or inside(args.lower, args.mountpoint):
        ap.error(f"LOWER {args.lower} and MOUNTPOINT {args.mountpoint} must not contain one another")
    check_control_and_store(ap, args)
