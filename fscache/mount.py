"""``fscache``: mount LOWER's tree at MOUNTPOINT, its clean pages cached in a host store, until unmounted."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from typing import Any

import pyfuse3
import trio

from pagewire.address import INPROC
from pagewire.auth import TokenError, load_token
from pagewire.messages import POOL_EPHEMERAL
from vswapcommon import metrics
from vswapcommon.logsetup import OUTPUT, setup_logging
from vswapcommon.sizes import PAGE_SIZE
from vswapfs.control import remove_stale, serve_control
from vswapfs.hostclient import HostClient
from vswapfs.mount import watch_signals
from vswapfs.options import default_name
from vswapfs.pagestore import StoreClient

from .cachestats import StoreFigures, cache_families
from .fs import Operations
from .options import build_parser, check_args
from .pagecache import PageCache

log = logging.getLogger("fscache")


class Unusable(Exception):
    """What keeps fscache from starting, said in one line."""


async def serve(ops: Operations, cache: PageCache, client: StoreClient, figures: StoreFigures,
                args: argparse.Namespace, stats: Any) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        nursery.start_soon(figures.follow)
        nursery.start_soon(watch_signals, args.mountpoint)
        if args.control:
            await nursery.start(serve_control, args.control, stats)
        if args.metrics_snapshot is not None:
            nursery.start_soon(metrics.publish_forever, args.metrics_snapshot, stats)
        await pyfuse3.main(min_tasks=4, max_tasks=args.max_tasks)
        await cache.release_store_copies()  # of no use to anyone now: the store gets the memory back at once
        nursery.cancel_scope.cancel()


def combined_stats(ops: Operations, cache: PageCache, client: StoreClient, figures: StoreFigures,
                   args: argparse.Namespace) -> dict[str, Any]:
    section = cache.stats()
    section.update(figures.latest)
    stats: dict[str, Any] = {"cache": section}
    client.report(stats)
    stats.update({"pid": os.getpid(), "lower": args.lower, "mountpoint": args.mountpoint,
                  "host_address": str(client.address), "host_connected": client.connected,
                  "open_files": sum(1 for h in ops.handles.values() if h.fd >= 0),
                  "known_inodes": len(ops.tree.nodes)})
    stats["log_lines_dropped"] = OUTPUT.dropped
    return stats


def _store_client(args: argparse.Namespace, token: bytes | None) -> StoreClient:
    name = args.name or default_name(args.mountpoint)
    if args.host.kind == INPROC:
        from vswapfs.inproc import from_options  # the store's package loads only for --host inproc

        return from_options(args, name, args.size, pool=POOL_EPHEMERAL)
    return HostClient(args.host, name, args.size, token=token, share=args.shared_memory,
                      insecure_tcp=args.insecure_tcp, pool=POOL_EPHEMERAL)


def _prepare(args: argparse.Namespace) -> tuple[Operations, PageCache, StoreClient, StoreFigures]:
    token = load_token(args.token_file) if args.token_file else None
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise Unusable("cannot mount: /dev/fuse is not open to this user")
    if args.control:
        try:
            remove_stale(args.control)
        except OSError as exc:
            raise Unusable(f"--control {args.control}: {exc.strerror or exc}") from None
    client = _store_client(args, token)
    cache = PageCache(client, args.size // PAGE_SIZE, store_timeout=args.store_timeout)
    try:
        ops = Operations(args.lower, cache)
    except OSError as exc:
        client.close()
        raise Unusable(f"LOWER {args.lower}: {exc.strerror or exc}") from None
    return ops, cache, client, StoreFigures(client)


def _raise_open_file_limit() -> None:
    """One descriptor is held per inode the kernel knows through the mount (``fscache.tree``):
    the usual soft limit of 1024 is one `ls -l` of a large directory away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    setup_logging(args.verbose, "fscache")
    OUTPUT.start()
    _raise_open_file_limit()
    os.umask(0)  # the kernel applied the caller's umask already; this daemon's must not apply too
    try:
        ops, cache, client, figures = _prepare(args)
    except (TokenError, Unusable) as exc:
        print(f"fscache: error: {exc}", file=sys.stderr)
        return 1
    stats = lambda: combined_stats(ops, cache, client, figures, args)  # noqa: E731
    try:
        args.metrics_snapshot = metrics.start(args.metrics, cache_families) if args.metrics else None
        _mount(ops, args.mountpoint)
    except (OSError, Unusable) as exc:
        ops.close()
        client.close()
        print(f"fscache: error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("serving %s at %s, up to %d MiB of file data named in the store at %s", args.lower,
             args.mountpoint, args.size >> 20, client.address)
    try:
        trio.run(serve, ops, cache, client, figures, args, stats)
    finally:
        try:
            pyfuse3.close(unmount=True)  # a cache holds nothing LOWER lacks: never leave a dead mount behind
        finally:
            ops.close()
            client.close()
    log.info("unmounted %s", args.mountpoint)
    return 0


def _mount(ops: Operations, mountpoint: str) -> None:
    options = set(pyfuse3.default_options) | {"fsname=fscache", "subtype=fscache"}
    if os.geteuid() == 0:
        options.add("allow_other")  # a cache of a shared tree serves every user (permissions: the kernel's)
    try:
        pyfuse3.init(ops, mountpoint, options)
    except (RuntimeError, OSError) as exc:
        raise Unusable(f"cannot mount on {mountpoint} ({exc})") from None


if __name__ == "__main__":
    sys.exit(main())
