"""``vswapctl up`` and ``down``: the device's life (the steps themselves are in ``vswapctl.device``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import Any


from pagewire.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from pagewire.address import INPROC, Address, parse_store_address
from pagewire.codec import DEFAULT_COMPRESS, add_compress_arguments, recompress_problem
from vswapcommon.cliutil import argtype, positive
from vswapfs.backingcheck import is_block_device

from .. import device, system
from ..state import Busy, default_backing
from .common import fail, interrupt, page_size, pressure_risks, read_vswapfs_stats, say


def _tier(text: str) -> str:
    from hoststore.tierconfig import parse_tier

    parse_tier(text)  # what is wrong with it, before anything starts
    return text


def absolute_host(host: Address | None) -> str | None:
    """The daemons run in / (vswapctl.launch): a socket path given relative to here is made absolute."""
    if host is None:
        return None
    return str(dataclasses.replace(host, path=os.path.abspath(host.path)) if host.kind == "unix" else host)


def absolute_source(source: str | None) -> str | None:
    """As for the host: ``file:PATH`` with PATH absolute."""
    kind, sep, path = (source or "").partition(":")
    return f"{kind}:{os.path.abspath(path)}" if kind == "file" and sep and path else source


def _existing_size(backing: str) -> int:
    """The size of an existing backing file or device (0 if there is none)."""
    if os.path.isfile(backing):
        return os.path.getsize(backing)
    return device.device_size(backing) if is_block_device(backing) else 0


def up_config(args: argparse.Namespace) -> device.UpConfig:
    backing = os.path.abspath(args.backing or default_backing(args.state_dir))
    size = args.size
    capacity = args.capacity or size or _existing_size(backing)
    return device.UpConfig(
        size=size, backing=backing,
        mountpoint=system.resolve_mountpoint(args.mountpoint or os.path.join(args.state_dir, "mnt")),
        capacity=capacity, host=absolute_host(args.host), token_file=args.token_file,
        insecure_tcp=args.insecure_tcp, writethrough=args.writethrough,
        pressure_source=absolute_source(args.pressure_source), priority=args.priority, discard=args.discard,
        swap=args.swap, verbose=args.verbose, start_timeout=args.start_timeout,
        extra_hoststore=["--tier", args.tier] if args.tier else [], compress=args.compress,
        recompress=recompress_argv(args),
    )


def recompress_argv(args: argparse.Namespace) -> list[str]:
    """The recompression options, passed on to the store up starts."""
    argv = []
    if args.recompress_after:
        argv += ["--recompress-after", str(args.recompress_after)]
    if args.recompress_rate is not None:
        argv += ["--recompress-rate", str(args.recompress_rate)]
    if args.recompress_dictionary:
        argv.append("--recompress-dictionary")
    return argv


def cmd_up(args: argparse.Namespace) -> int:
    if args.token_file and not args.host:
        return fail("--token-file is for a store at --host; the store up starts listens on a private unix socket")
    if args.tier and args.host:
        return fail("--tier is for the hoststore up starts; a store at --host has its own")
    if args.compress != DEFAULT_COMPRESS and args.host and args.host.kind != INPROC:
        return fail("--compress is for the store up starts; a store at --host keeps pages as it was started to")
    if args.recompress_after and args.tier:
        return fail("--recompress-after does not go with --tier: idle pages are recompressed in the store's memory")
    problem = recompress_problem(args)
    if problem:
        return fail(problem)
    if args.tier and args.pressure_source:
        return fail("--pressure-source does not go with --tier: the cluster's memory is the pressure")
    if args.token_file and args.host.kind == INPROC:
        return fail("--token-file is for a store at an address; --host inproc has none")
    problem = check_tcp_options([args.host] if args.host else [], bool(args.token_file), args.insecure_tcp)
    if problem:
        return fail(problem)
    if args.token_file:
        from pagewire.auth import TokenError, load_token

        try:
            load_token(args.token_file)  # refused now, before anything is changed
        except TokenError as exc:
            return fail(str(exc))
    # SIGTERM or a closed terminal mid-up: undo what was done, as for ^C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        state = device.bring_up(args.state_dir, up_config(args), say)
    except (device.UpFailed, Busy) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted; what up had done was undone")
    risks = pressure_risks(state, read_vswapfs_stats(state))
    for risk in [risks] if isinstance(risks, str) else risks:
        say(f"warning: not safe under machine-wide memory pressure: {risk}")
    if state.loop:
        say(f"up: `cat /proc/swaps` lists {state.loop}; `vswapctl status` shows where pages live")
    else:
        say(f"up without swap: {state.swapfile} is served; `vswapctl down` takes it down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        done = device.take_down(args.state_dir, say)
    except Busy as exc:
        return fail(str(exc))
    except (system.CommandFailed, OSError) as exc:
        return fail(f"down stopped: {exc}; run it again once that is fixed")
    if not done:
        print("vswapctl: error: down stopped: the device is still swapped on (see above)", file=sys.stderr)
        return 1
    say("down")
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to ``vswapctl``'s subparsers."""
    _add_up(sub)
    _add_down(sub)


def _add_up(sub: Any) -> None:
    up = sub.add_parser("up", help="start the daemons, attach a loop device, mkswap and swapon",
                        description="Start a hoststore (unless --host), mount vswapfs, attach a loop device "
                                    "with direct I/O, mkswap and swapon it.")
    up.add_argument("--size", type=argtype(page_size), help="device size (K/M/G); needed unless the backing "
                                                           "file exists")
    up.add_argument("--host", type=argtype(parse_store_address), metavar="ADDR",
                    help="use a running hoststore (unix:PATH or tcp:HOST:PORT) instead of starting one, or "
                         "`inproc`: keep admitted pages in vswapfs's own memory, no store daemon (--capacity "
                         "then bounds that memory)")
    up.add_argument("--token-file", metavar="PATH",
                    help="with --host: the store's shared token (mode 0600), proven both ways at hello; needed "
                         "with --host tcp:... (but see --insecure-tcp)")
    up.add_argument("--insecure-tcp", action="store_true",
                    help="with --host tcp:HOST:PORT on loopback and no --token-file: tell vswapfs to use it "
                         f"anyway, giving up what the token proves: {INSECURE_TCP_GIVES_UP}")
    up.add_argument("--backing", metavar="FILE|DEVICE",
                    help="backing file on a disk filesystem, one per device (default: "
                         "/var/lib/vswapfs/<the state dir's path>/backing, created, and removed by down); or a "
                         "block device of its own (a partition or a disk that holds nothing: it is refused if "
                         "mounted, swapped on, partitioned or carrying a filesystem or swap signature), which "
                         "has no filesystem journal at all; --size then defaults to the device's")
    up.add_argument("--mountpoint", metavar="DIR", help="where to mount vswapfs (default STATE_DIR/mnt)")
    up.add_argument("--capacity", type=argtype(page_size), metavar="SIZE",
                    help="capacity of the hoststore that up starts (default: the device size)")
    add_compress_arguments(up, whose="for the store up starts (hoststore, or vswapfs with --host inproc): ")
    up.add_argument("--writethrough", action="store_true",
                    help="vswapfs writes every page to the backing file too: losing the store loses nothing "
                         "(default: write-back)")
    up.add_argument("--pressure-source", metavar="SOURCE",
                    help="the started hoststore's pressure source: psutil (default) or file:PATH, a used-memory "
                         "percentage read from PATH (to steer hand-back in experiments and tests)")
    up.add_argument("--tier", type=argtype(_tier), metavar="redis-cluster://HOST:PORT[,...]",
                    help="the started hoststore keeps its pages in this Redis Cluster instead of its own memory "
                         "(tools/redis-cluster.sh up DIR starts a local one)")
    up.add_argument("--priority", type=int, metavar="N", help="swap priority (swapon --priority)")
    up.add_argument("--no-discard", dest="discard", action="store_false",
                    help="do not swapon with --discard=pages (freed swap slots then stay in the store "
                         "until rewritten)")
    up.add_argument("--no-swap", dest="swap", action="store_false",
                    help="mount vswapfs and stop there: no loop device, no swap (the file, for experiments)")
    up.add_argument("--start-timeout", type=argtype(positive), default=device.READY_TIMEOUT, metavar="SECONDS",
                    help=f"how long each daemon may take to say it is ready before up gives up and undoes "
                         f"what it did (default {device.READY_TIMEOUT:g}; more on a slow or emulated machine)")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging in the daemons' logs")
    up.set_defaults(func=cmd_up)


def _add_down(sub: Any) -> None:
    down = sub.add_parser("down", help="swapoff, losetup -d, unmount, stop what up started",
                          description="Undo `up`, also after a run whose daemons died.  If swapoff fails "
                                      "(ENOMEM: RAM cannot take the swapped pages back), down stops right there "
                                      "and leaves everything running: nothing that serves swap pages is ever "
                                      "stopped, unmounted or detached.  Free memory and run it again.")
    down.set_defaults(func=cmd_down)
