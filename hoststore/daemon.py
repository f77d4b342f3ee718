"""``hoststore``: the daemon keeping accepted swap pages in RAM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from .address import Address, parse_address
from .cliutil import argtype
from .hardening import harden
from .logsetup import setup_logging
from .policy import Limits
from .pressure import Sampler
from .protocol import PAGE_SIZE
from .server import open_listener, serve
from .sizes import parse_size
from .store import Store

log = logging.getLogger("hoststore")

DESCRIPTION = """\
Keep swap pages offered by vswapfs clients in RAM, accepting or refusing each
page by memory pressure (with a high and a low watermark), a hard capacity and
an optional per-client quota.  Refused pages are written to the client's
backing file, so refusing is always safe.
"""

EPILOG = """\
examples:
  hoststore --listen unix:/run/vswapfs/host.sock --capacity 2G
  hoststore --listen unix:/run/h.sock --listen tcp:127.0.0.1:7070 --capacity 512M --quota 256M

The TCP listener has no authentication: bind it to loopback or a trusted network.
"""


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage") from None
    if not 0 < value <= 100:
        raise ValueError(f"{text} is not within (0, 100]")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hoststore",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--listen", action="append", type=argtype(parse_address), required=True, metavar="ADDR",
                    help="unix:PATH or tcp:HOST:PORT; repeat to listen on several")
    ap.add_argument("--capacity", type=argtype(parse_size), default=parse_size("1G"), metavar="SIZE",
                    help="most page data held for all clients together (K/M/G suffixes; default 1G)")
    ap.add_argument("--quota", type=argtype(parse_size), default=None, metavar="SIZE",
                    help="most page data held for any one client (default: no quota)")
    ap.add_argument("--high-watermark", type=argtype(_percent), default=90.0, metavar="PCT",
                    help="refuse pages once used memory reaches PCT%% of RAM (default 90)")
    ap.add_argument("--low-watermark", type=argtype(_percent), default=80.0, metavar="PCT",
                    help="after refusing, accept again once used memory falls to PCT%% (default 80)")
    ap.add_argument("--pressure-interval", type=float, default=0.005, metavar="SECONDS",
                    help="read memory pressure at most this often (default 0.005)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def limits_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Limits:
    if args.low_watermark > args.high_watermark:
        ap.error(f"--low-watermark {args.low_watermark} is above --high-watermark {args.high_watermark}")
    if args.capacity % PAGE_SIZE:
        ap.error(f"--capacity {args.capacity} is not a multiple of {PAGE_SIZE}")
    if args.quota is not None and args.quota % PAGE_SIZE:
        ap.error(f"--quota {args.quota} is not a multiple of {PAGE_SIZE}")
    if args.pressure_interval < 0:
        ap.error("--pressure-interval must not be negative")
    return Limits(
        high_percent=args.high_watermark,
        low_percent=args.low_watermark,
        capacity_pages=args.capacity // PAGE_SIZE,
        quota_pages=None if args.quota is None else args.quota // PAGE_SIZE,
    )


async def run(addresses: list[Address], store: Store) -> None:
    try:
        listeners = [await open_listener(a) for a in addresses]
    except OSError as exc:
        raise SystemExit(f"hoststore: error: cannot listen: {exc.strerror or exc}") from None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve, listeners, store)
            log.info("listening on %s; capacity %d pages", ", ".join(map(str, bound)),
                     store.limits.capacity_pages)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    for a in addresses:
        if a.kind == "unix":
            try:
                os.unlink(a.path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    limits = limits_from_args(ap, args)
    setup_logging(args.verbose, "hoststore")
    harden(log)
    store = Store(limits, Sampler(args.pressure_interval))
    try:
        trio.run(run, args.listen, store)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
