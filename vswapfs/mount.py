"""``vswapfs``: mount the swap file, serve it until unmounted."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from pagewire.address import INPROC
from pagewire.auth import TokenError, load_token
from vswapcommon import metrics
from vswapcommon.hardening import harden
from vswapcommon.logsetup import OUTPUT, setup_logging

from . import fusectl
from .backing import Backing, BackingError
from .control import remove_stale, serve_control
from .fs import DISCARD_SUPPORTED, SPLICE_READ_CAN_BE_OFF, Operations
from .hostclient import HostClient
from .options import build_parser, check_args, default_name
from .pager import Pager
from .pagermetrics import pager_families
from .pagestore import StoreClient

log = logging.getLogger("vswapfs")

async def watch_signals(mountpoint: str, refusal: Callable[[], str | None] = lambda: None) -> None:
    """Unmount on SIGTERM/SIGINT, unless ``refusal()`` says why not (for vswapfs: the swap
    file is still open).

    Stopping then would take away pages that live swap still needs: every
    process with pages on the device would get SIGBUS or hang.  The stop is an
    ordinary unmount, run beside the FUSE loop: the kernel refuses it (EBUSY) if
    anything opened the file meanwhile, so there is no window between checking
    and stopping; once it succeeds the FUSE loop ends by itself."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            why = refusal()
            if why:
                log.warning("%s ignored: %s", name, why)
                continue
            log.info("%s: unmounting", name)
            argv = ["umount", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-u", mountpoint]
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60))
            if done.returncode:
                log.warning("%s ignored: %s", name, (done.stderr or done.stdout).strip() or "unmount refused")
                continue
            return


def swap_open(ops: Operations) -> str | None:
    if ops.swap_opens:
        return "the swap file is still open (swapoff and losetup -d it first, or run `vswapctl down`)"
    return None


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




async def serve(ops: Operations, pager: Pager, client: StoreClient, args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        nursery.start_soon(pager.drop_orphans)
        nursery.start_soon(watch_signals, args.mountpoint, lambda: swap_open(ops))
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
    client.report(stats)
    stats["host_address"] = str(client.address)
    stats["backing_file"] = pager.backing.path
    stats["pid"] = os.getpid()
    stats["swap_opens"] = ops.swap_opens
    stats["discard_supported"] = DISCARD_SUPPORTED
    stats["fuse_splice_read"] = getattr(ops, "splice_read", True)  # negotiated at init (the patch says)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    try:
        token = load_token(args.token_file) if args.token_file else None
        setup_logging(args.verbose, "vswapfs")
        OUTPUT.start()  # from here on, nothing waits for the log file
        _check_fuse_access()
        if args.control:
            _remove_stale_control(args.control)
        backing = Backing.open(args.backing, args.size, args.mountpoint, frozenset(args.allow_backing_fs))
    except (TokenError, BackingError, Unusable) as exc:
        print(f"vswapfs: error: {exc}", file=sys.stderr)
        return 1
    try:
        client = _store_client(args, args.name or default_name(args.mountpoint), backing.size, token)
        pager = Pager(backing, client, write_timeout=args.write_timeout, read_timeout=args.read_timeout,
                      writethrough=args.writethrough, pressure_holdoff=args.pressure_holdoff)
        ops = Operations(pager)
        unhardened = _harden()
        ops.stats = lambda: combined_stats(pager, client, ops, unhardened)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal must not take the swap device with it
        _warn_of_risks(backing)
        args.metrics_snapshot = _start_metrics(args)  # before the mount: a port in use leaves no mount behind
        _mount(ops, args.mountpoint)
    except Unusable as exc:
        backing.close()
        client.close()
        print(f"vswapfs: error: {exc}", file=sys.stderr)
        return 1
    log.info("serving %s/swap (%d bytes, %s), backing %s, host store %s", args.mountpoint, backing.size,
             "write-through" if args.writethrough else "write-back", backing.path, client.address)
    try:
        trio.run(serve, ops, pager, client, args)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    else:
        pyfuse3.close()
    finally:
        backing.close()
        client.close()
    log.info("unmounted %s", args.mountpoint)
    return 0


class Unusable(Exception):
    """What keeps vswapfs from starting, said in one line."""


def _check_fuse_access() -> None:
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise Unusable("cannot mount: /dev/fuse is not open to this user (run as root, or make /dev/fuse "
                       "accessible and install fusermount3)")


def _remove_stale_control(path: str) -> None:
    try:
        remove_stale(path)
    except OSError as exc:
        raise Unusable(f"--control {path}: {exc.strerror or exc}") from None


def _store_client(args: argparse.Namespace, name: str, device_size: int, token: bytes | None) -> StoreClient:
    if args.host.kind == INPROC:
        from .inproc import from_options  # the store's package loads only for --host inproc

        return from_options(args, name, device_size)
    return HostClient(args.host, name, device_size, token=token, share=args.shared_memory,
                      insecure_tcp=args.insecure_tcp)


def _harden() -> list[str]:
    """Harden this process; what keeps it from being safe under machine-wide memory pressure."""
    unhardened = harden(log)
    if not SPLICE_READ_CAN_BE_OFF:
        unhardened.append("pyfuse3 without the splice patch: each FUSE request read makes the kernel "
                          "allocate (install pyfuse3 with tools/bootstrap.sh)")
        log.warning("not safe under machine-wide memory pressure: %s", unhardened[-1])
    return unhardened


def _warn_of_risks(backing: Backing) -> None:
    for risk in backing.pressure_risks:
        log.warning("not safe under machine-wide memory pressure: %s", risk)
    if not DISCARD_SUPPORTED:
        log.warning("this pyfuse3 has no fallocate handler: discard is unavailable, so freed swap slots "
                    "stay in the store (install pyfuse3 with tools/bootstrap.sh to get it)")


def _start_metrics(args: argparse.Namespace) -> Any:
    if not args.metrics:
        return None
    try:
        return metrics.start(args.metrics, pager_families)
    except OSError as exc:
        raise Unusable(f"--metrics {args.metrics[0]}:{args.metrics[1]}: {exc.strerror or exc}") from None


def _mount(ops: Operations, mountpoint: str) -> None:
    options = set(pyfuse3.default_options)
    options |= {"fsname=vswapfs", "subtype=vswapfs"}
    try:
        pyfuse3.init(ops, mountpoint, options)
    except (RuntimeError, OSError) as exc:
        raise Unusable(f"cannot mount on {mountpoint} ({exc}): FUSE needs root, or /dev/fuse open to you "
                       f"and fusermount3") from None


if __name__ == "__main__":
    sys.exit(main())
