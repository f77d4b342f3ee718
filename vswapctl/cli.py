"""``vswapctl``: bring a vswapfs swap device up and down, and look inside it.

The device's life (up, down, the rule that nothing serving swap pages is ever
stopped) lives in ``vswapctl.device``; this module is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from functools import partial
from typing import Any

import trio

from pagewire.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from pagewire.address import INPROC, Address, parse_address, parse_store_address
from vswapcommon.cliutil import argtype, count, percent, positive, quota
from pagewire.messages import PAGE_SIZE, Drain, Stats
from vswapcommon.sizes import format_size, parse_size
from vswapfs.backingcheck import is_block_device

from . import device, launch, system
from .state import DEFAULT_STATE_DIR, Busy, State, default_backing

CONTROL_TIMEOUT = 2.0


def say(message: str) -> None:
    print(f"vswapctl: {message}", flush=True)


# -- up and down -------------------------------------------------------------------------


def _tier(text: str) -> str:
    from hoststore.tierconfig import parse_tier

    parse_tier(text)  # what is wrong with it, before anything starts
    return text


def _absolute_host(host: Address | None) -> str | None:
    """The daemons run in / (vswapctl.launch): a socket path given relative to here is made absolute."""
    if host is None:
        return None
    return str(dataclasses.replace(host, path=os.path.abspath(host.path)) if host.kind == "unix" else host)


def _absolute_source(source: str | None) -> str | None:
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
        capacity=capacity, host=_absolute_host(args.host), token_file=args.token_file,
        insecure_tcp=args.insecure_tcp, writethrough=args.writethrough,
        pressure_source=_absolute_source(args.pressure_source), priority=args.priority, discard=args.discard,
        swap=args.swap, verbose=args.verbose, start_timeout=args.start_timeout,
        extra_hoststore=["--tier", args.tier] if args.tier else [],
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cmd_up(args: argparse.Namespace) -> int:
    if args.token_file and not args.host:
        return _fail("--token-file is for a store at --host; the store up starts listens on a private unix socket")
    if args.tier and args.host:
        return _fail("--tier is for the hoststore up starts; a store at --host has its own")
    if args.tier and args.pressure_source:
        return _fail("--pressure-source does not go with --tier: the cluster's memory is the pressure")
    if args.token_file and args.host.kind == INPROC:
        return _fail("--token-file is for a store at an address; --host inproc has none")
    problem = check_tcp_options([args.host] if args.host else [], bool(args.token_file), args.insecure_tcp)
    if problem:
        return _fail(problem)
    if args.token_file:
        from pagewire.auth import TokenError, load_token

        try:
            load_token(args.token_file)  # refused now, before anything is changed
        except TokenError as exc:
            return _fail(str(exc))
    # SIGTERM or a closed terminal mid-up: undo what was done, as for ^C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        state = device.bring_up(args.state_dir, up_config(args), say)
    except (device.UpFailed, Busy) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; what up had done was undone")
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
        return _fail(str(exc))
    except (system.CommandFailed, OSError) as exc:
        return _fail(f"down stopped: {exc}; run it again once that is fixed")
    if not done:
        print("vswapctl: error: down stopped: the device is still swapped on (see above)", file=sys.stderr)
        return 1
    say("down")
    return 0


# -- status and stats ------------------------------------------------------------------


def _need_state(args: argparse.Namespace) -> State:
    state = State.load(args.state_dir)
    if state is None:
        raise SystemExit(f"vswapctl: error: no device is up (no state in {args.state_dir})")
    return state


def read_vswapfs_stats(state: State) -> dict[str, Any] | str:
    """From vswapfs's control socket, never from inside the mount: a stopped vswapfs
    costs at most CONTROL_TIMEOUT, and says so."""
    from vswapfs.control import ControlUnavailable, query

    try:
        return query(state.control, CONTROL_TIMEOUT)
    except ControlUnavailable as exc:
        return str(exc)


@dataclasses.dataclass(frozen=True)
class StoreTarget:
    """A store daemon as a command reaches it: its address, its token file ("" for
    none), and whether TCP without a token was accepted (--insecure-tcp)."""

    address: Address
    token_file: str = ""
    insecure_tcp: bool = False

    @classmethod
    def of(cls, state: State) -> "StoreTarget":
        """The store of the device in ``state``, reached as `up` was told to."""
        return cls(parse_address(state.host), state.token_file, state.insecure_tcp)

    def token(self) -> bytes | None:
        """The token, read from its file now (TokenError if it cannot be used)."""
        from pagewire.auth import load_token

        return load_token(self.token_file) if self.token_file else None

    def ask(self, message: Any, wait: float | None = None) -> Any:
        """One request on a fresh observer connection, its answer waited for ``wait``
        seconds (default CONTROL_TIMEOUT).  Raises StoreUnavailable, StoreError (a
        TCP store refused by the --insecure-tcp rule too), TokenError or OSError."""
        from vswapfs.hostclient import query

        return trio.run(partial(query, self.address, message, CONTROL_TIMEOUT, self.token(),
                                insecure_tcp=self.insecure_tcp, wait=wait))


def read_host_stats(target: StoreTarget) -> dict[str, Any] | str:
    from pagewire.auth import TokenError
    from vswapfs.pagestore import StoreError, StoreUnavailable

    try:
        return target.ask(Stats())
    except (StoreUnavailable, StoreError, OSError, ValueError, TokenError) as exc:
        return f"unreachable: {exc}"


def _running(ident: Any) -> str:
    if ident is None:
        return "not started by up"
    if ident.stopped():
        return f"pid {ident.pid} STOPPED (SIGSTOP)"
    return f"pid {ident.pid} running" if ident.alive() else f"pid {ident.pid} NOT RUNNING"


def cmd_status(args: argparse.Namespace) -> int:
    state = _need_state(args)
    fs = read_vswapfs_stats(state)
    swap = system.swaps().get(state.loop) if state.loop else None
    fs_ok = isinstance(fs, dict)
    status: dict[str, Any] = {
        "loop": state.loop or None,
        "direct_io": system.loop_dio(state.loop) if state.loop else None,
        "swap": swap,
        "mountpoint": state.mountpoint,
        "mounted": system.mount_type(state.mountpoint) == "fuse.vswapfs",
        "vswapfs": _running(state.vswapfs_id),
        "host": state.host,
        "hoststore": _running(state.hoststore_id) if state.hoststore_id else
        "in vswapfs" if state.host == INPROC else "external",
        "backing": state.backing,
        "pages": {k: fs.get(f"pages_{k}", 0) for k in ("host", "host_and_backing", "backing", "same_filled",
                                                       "unwritten", "lost_now")}
        if fs_ok else None,
        "host_connected": fs["host_connected"] if fs_ok else None,
        "vswapfs_stats": None if fs_ok else fs,
        "pressure_risks": pressure_risks(state, fs),
    }
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    dev = state.loop or "(no loop device: up --no-swap)"
    if swap:
        dev += f"  swap on, priority {swap['priority']}, used {format_size(swap['used_kib'] * 1024)} " \
               f"of {format_size(swap['size_kib'] * 1024)}"
    if state.loop:
        dev += f"  direct I/O {'on' if status['direct_io'] else 'off'}"
    rows = [
        ("device", dev),
        ("vswapfs", f"{status['vswapfs']}, {state.mountpoint}" + ("" if status["mounted"] else " (NOT MOUNTED)")),
        ("host store", f"{state.host} ({status['hoststore']})" + (
            "" if not fs_ok else ", connected" if fs["host_connected"] else ", NOT CONNECTED")),
        ("backing", state.backing),
    ]
    risks = status["pressure_risks"]
    rows.append(("machine-wide pressure", "unknown: " + risks if isinstance(risks, str) else
                 "configured for it" if not risks else "NOT configured for it: " + "; ".join(risks)))
    if fs_ok:
        pages = status["pages"]
        rows.append(("pages", f"host {pages['host']} ({format_size(pages['host'] * PAGE_SIZE)})  "
                              f"host+backing {pages['host_and_backing']}  "
                              f"backing {pages['backing']} ({format_size(pages['backing'] * PAGE_SIZE)})  "
                              f"same-filled {pages['same_filled']}  "
                              f"never written {pages['unwritten']}  lost {pages['lost_now']}"))
    else:
        rows.append(("pages", f"unknown: {fs}"))
    _table(rows)
    return 0


def pressure_risks(state: State, fs: dict[str, Any] | str) -> list[str] | str:
    """What keeps the device from being safe under machine-wide memory pressure
    (docs/pressure.md): vswapfs's own findings, and those of a store up started."""
    if isinstance(fs, str):
        return f"vswapfs {fs}"
    risks = list(fs.get("pressure_risks", []))
    if state.hoststore_id:
        host = read_host_stats(StoreTarget.of(state))
        if isinstance(host, str):
            risks.append(f"the hoststore is {host}")
        else:
            risks += [f"hoststore: {risk}" for risk in host.get("pressure_risks", [])]
    return risks


def cmd_stats(args: argparse.Namespace) -> int:
    state = _need_state(args)
    fs = read_vswapfs_stats(state)
    if state.host == INPROC:  # the store lives in vswapfs: its counters came with vswapfs's
        host = fs.pop("inproc_store", "not reported") if isinstance(fs, dict) else "inside vswapfs, which " + fs
    else:
        host = read_host_stats(StoreTarget.of(state))
    if args.json:
        print(json.dumps({"vswapfs": fs, "hoststore": host}, indent=1, sort_keys=True))
        return 0
    print("vswapfs" + (f": {fs}" if isinstance(fs, str) else ""))
    if isinstance(fs, dict):
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


WITH_HOST_ONLY = "--token-file and --insecure-tcp go with --host; the device's store is reached as `up` was told"


def _store_target(args: argparse.Namespace, inproc: str) -> StoreTarget | str:
    """The store a command talks to: --host (with --token-file or --insecure-tcp), or
    the device's in the state directory, reached as `up` was told to.  A str says
    why not (``inproc``: what to say of a device without a store daemon)."""
    if args.host is not None:
        target = StoreTarget(args.host, args.token_file or "", args.insecure_tcp)
    elif args.token_file or args.insecure_tcp:
        return WITH_HOST_ONLY
    else:
        state = _need_state(args)
        if state.host == INPROC:
            return f"this device has no store daemon (--host inproc): {inproc}"
        target = StoreTarget.of(state)
    return check_tcp_options([target.address], bool(target.token_file), target.insecure_tcp) or target


def _store_options(parser: argparse.ArgumentParser, host_help: str = "the store's address (default: the one "
                   "in the state directory)") -> None:
    """--host, and how to reach a store there: the same for every command that asks one."""
    parser.add_argument("--host", type=argtype(parse_address), metavar="ADDR", help=host_help)
    parser.add_argument("--token-file", metavar="PATH",
                        help="with --host: the store's token (mode 0600), proven both ways at hello (default: "
                             "the device's store uses the token `up` was given)")
    parser.add_argument("--insecure-tcp", action="store_true",
                        help="with --host tcp:HOST:PORT on loopback: ask without a token, giving up what it "
                             f"proves: {INSECURE_TCP_GIVES_UP}")


def _configure(args: argparse.Namespace, message: Any, what: str) -> int:
    from pagewire.auth import TokenError
    from vswapfs.hostclient import StoreError, StoreUnavailable

    target = _store_target(args, f"{what} needs one")
    if isinstance(target, str):
        return _fail(target)
    try:
        answer = target.ask(message)
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return _fail(f"{what} at {target.address}: {exc}")
    if args.json:
        print(json.dumps(answer, indent=1, sort_keys=True))
        return 0
    quotas = ", ".join(f"{k} {format_size(v * PAGE_SIZE)}" for k, v in sorted(answer["quotas"].items())) or "none"
    default = "none" if answer["quota_pages"] is None else format_size(answer["quota_pages"] * PAGE_SIZE)
    _table([("policy", answer["policy"]),
            ("capacity", format_size(answer["capacity_pages"] * PAGE_SIZE)),
            ("watermarks", f"high {answer['high_percent']:g}%, low {answer['low_percent']:g}%"),
            ("quota", f"default {default}; by client: {quotas}")])
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    from pagewire.messages import Configure

    return _configure(args, Configure(policy=args.spec), "the store's policy")


def cmd_limits(args: argparse.Namespace) -> int:
    from pagewire.messages import Configure

    quotas = {name or "": size for name, size in args.quota} or None
    return _configure(args, Configure(capacity=args.capacity, high_percent=args.high_watermark,
                                      low_percent=args.low_watermark, quotas=quotas), "the store's limits")


def format_event(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event["time"])) + f".{int(event['time'] * 1000) % 1000:03d}"
    kind, client = event["event"], event.get("client", "?")
    if kind == "put":
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(event["refused"].items()))
        return (f"{when} put        {client}: pages {event['first']}+{event['pages']}: stored {event['stored']}"
                + (f", refused {refused}" if refused else "") + f"  (used {event['used_percent']:.1f}%, "
                f"policy {event['policy']})")
    if kind == "handback":
        return (f"{when} handback   {client}: {event['pages']} pages ({event['cause']}): freed {event['freed']}, "
                f"not needed {event['not_needed']}, failed {event['failed']}")
    return f"{when} {kind:<10} {client}: {event.get('pages', '?')} pages"


def cmd_trace(args: argparse.Namespace) -> int:
    from pagewire.auth import TokenError
    from pagewire.messages import TraceRead
    from vswapfs.hostclient import StoreError, StoreUnavailable, follow

    target = _store_target(args, "the trace needs one")
    if isinstance(target, str):
        return _fail(target)
    address = target.address

    def show(answer: dict[str, Any]) -> None:
        if answer["dropped"]:
            print(json.dumps({"event": "dropped", "events": answer["dropped"]}) if args.json
                  else f"... {answer['dropped']} events dropped (this reader was too slow)", flush=True)
        for event in answer["events"]:
            print(json.dumps(event, sort_keys=True) if args.json else format_event(event), flush=True)

    try:
        token = target.token()
        try:
            trio.run(partial(follow, address, TraceRead(sample=args.sample, wait=1.0), show, CONTROL_TIMEOUT,
                             token, insecure_tcp=target.insecure_tcp))
        except* KeyboardInterrupt:  # ^C is how a trace ends (trio may hand it over in a group)
            pass
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return _fail(f"trace of {address}: {exc}")
    return 0


def _readers(args: argparse.Namespace) -> tuple[Any, Any, str] | str:
    """(read vswapfs's stats, read the store's, a title); a str says why not."""
    if args.host is not None:
        target = _store_target(args, "")
        if isinstance(target, str):
            return target
        return (lambda: None), (lambda: read_host_stats(target)), f"store {args.host}"
    if args.token_file or args.insecure_tcp:
        return WITH_HOST_ONLY
    state = State.load(args.state_dir)
    if state is None:
        return f"no device is up in {args.state_dir} (give --host ADDR to watch a store alone)"
    if state.host == INPROC:
        def store() -> Any:
            fs = read_vswapfs_stats(state)
            return fs.get("inproc_store") if isinstance(fs, dict) else None
        return (lambda: read_vswapfs_stats(state)), store, f"vswapfs {state.mountpoint} (inproc store)"
    return ((lambda: read_vswapfs_stats(state)), (lambda: read_host_stats(StoreTarget.of(state))),
            f"vswapfs {state.mountpoint}, store {state.host}")


def _samples(args: argparse.Namespace, readers: tuple[Any, Any, str]) -> Any:
    from . import watch

    n = 0
    while args.count is None or n < args.count:
        if n:
            time.sleep(args.interval)
        yield watch.take(readers[0], readers[1])
        n += 1


def cmd_top(args: argparse.Namespace) -> int:
    from . import watch

    readers = _readers(args)
    if isinstance(readers, str):
        return _fail(readers)
    clear = "\033[H\033[2J" if sys.stdout.isatty() else "\n"
    previous = None
    try:
        for sample in _samples(args, readers):
            per_second = watch.rates(previous, sample) if previous else {}
            print(clear + watch.render(sample, per_second, readers[2]), flush=True)
            previous = sample
    except KeyboardInterrupt:
        pass
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from . import watch

    readers = _readers(args)
    if isinstance(readers, str):
        return _fail(readers)
    fmt = "csv" if args.file.endswith(".csv") else "json"
    header = None
    n = 0
    try:
        with open(args.file, "a", newline="") as out:
            for sample in _samples(args, readers):
                header = watch.write_sample(out, sample, fmt, header)
                out.flush()
                n += 1
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}")
    say(f"recorded {n} samples to {args.file}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import watch

    try:
        samples = watch.read_recording(args.file)
        watch.plot(samples, args.output)
    except ImportError:
        return _fail("plot needs matplotlib, an optional extra: pip install 'vswapfs[chart]'")
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot plot {args.file}: {exc}")
    say(f"plotted {len(samples)} samples to {args.output}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Ask a hoststore to hand every page back to its clients and exit."""
    from pagewire.auth import TokenError
    from vswapfs.hostclient import StoreError, StoreUnavailable

    target = _store_target(args, "its pages leave vswapfs's memory as swapoff reads them back (`vswapctl down`)")
    if isinstance(target, str):
        return _fail(target)
    address = target.address
    say(f"draining the host store at {address}: it hands every page back to its clients, then exits")
    try:
        report = target.ask(Drain(), wait=args.timeout if args.timeout is not None else math.inf)
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return _fail(f"drain of {address} failed: {exc}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    handed = sum(report.get("handed_back", {}).values())
    dropped = report.get("dropped", {})
    say(f"handed back {handed} pages ({format_size(handed * PAGE_SIZE)})")
    for name, pages in sorted(dropped.items()):
        say(f"DROPPED: client {name!r} did not take back {pages} pages ({format_size(pages * PAGE_SIZE)})")
    return 1 if dropped else 0


def cmd_evict(args: argparse.Namespace) -> int:
    """Drop the pages of a client that is away, and free its name."""
    from pagewire.auth import TokenError
    from pagewire.messages import Evict, MessageError, check_client_name
    from vswapfs.hostclient import StoreError, StoreUnavailable

    try:
        check_client_name(args.name)
    except MessageError as exc:
        return _fail(f"NAME: {exc}")
    target = _store_target(args, "its only client is vswapfs itself")
    if isinstance(target, str):
        return _fail(target)
    try:
        answer = target.ask(Evict(args.name, args.force))
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return _fail(f"evict of {args.name!r} at {target.address}: {exc}")
    if args.json:
        print(json.dumps(answer, indent=1, sort_keys=True))
    else:
        say(f"evicted client {answer['client']!r}: dropped {answer['dropped']} pages "
            f"({format_size(answer['dropped'] * PAGE_SIZE)}); its name is free")
    return 0


# -- microbench ---------------------------------------------------------------------


def cmd_microbench(args: argparse.Namespace) -> int:
    from . import microbench

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
    from . import membench

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


# -- the page tier --------------------------------------------------------------------


def _instance(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", text):
        raise ValueError(f"{text!r} is not a store instance (16 hex digits, as `vswapctl tier-sweep URL` lists)")
    return text


def cmd_tier_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hoststore.redistier import TierUnavailable, connect

    config = replace(args.tier, prefix=args.prefix)
    try:
        tier = connect(config, args.instance or "")
        try:
            if not args.instance:
                found = tier.instances()
                if not found:
                    say(f"no keys under {args.prefix}: in {config}")
                for instance, entry in sorted(found.items()):
                    print(f"{instance}  {entry.keys} keys  {_liveness(entry.heartbeat)}")
                return 0
            # Asked of every master (one that does not answer is an error): a running store
            # has a heartbeat on each, so one failover cannot hide it.
            entry = tier.instances(args.instance).get(args.instance)
            if entry is not None and entry.heartbeat is not None:
                ttl = entry.heartbeat.get("ttl")
                after = f"{ttl:g} s" if isinstance(ttl, int | float) else "its TTL"
                return _fail(f"store instance {args.instance} is {_liveness(entry.heartbeat)}: its keys hold its "
                             "clients' pages, and tier-sweep deletes only what a store that is gone left (its "
                             f"heartbeat expires {after} after it stops)")
            deleted = tier.sweep()
        finally:
            tier.close()
    except TierUnavailable as exc:
        return _fail(str(exc))
    say(f"deleted {deleted} keys of store instance {args.instance}")
    return 0


def _liveness(heartbeat: dict[str, object] | None) -> str:
    """How tier-sweep shows a store instance: running (its heartbeat says where), or gone."""
    if heartbeat is None:
        return "gone (no heartbeat): tier-sweep may delete its keys"
    where = ", ".join(f"{k} {heartbeat[k]}" for k in ("host", "pid") if k in heartbeat)
    return f"running ({where or 'a heartbeat'})"


# -- attack -------------------------------------------------------------------------


def cmd_attack(args: argparse.Namespace) -> int:
    from . import attack

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


# -- faults -------------------------------------------------------------------------


def cmd_faults(args: argparse.Namespace) -> int:
    from . import faults

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
        argv = launch.module_argv("vswapctl.workload", "--size", str(args.size), "--passes", str(args.passes))
        done = cg.run(argv, cwd=launch.WORKDIR)
    finally:
        cg.remove()
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode < 0:
        return _fail(f"workload killed by signal {-done.returncode} (OOM? is swap on and large enough?)")
    return done.returncode


# -- bench --------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, benchreport, cgroup

    small = args.small_capacity or args.size // 4 // PAGE_SIZE * PAGE_SIZE
    cfg = bench.BenchConfig(size=args.size, limit=args.limit, device_size=args.device_size, small_capacity=small,
                            runs=args.runs, targets=args.targets, data=args.data)
    problems = bench.check_config(cfg)
    if problems:
        return _fail("; ".join(problems))
    if os.geteuid() != 0:
        return _fail("bench needs root (swap devices, loop devices, memory cgroups)")

    def progress(message: str) -> None:  # with --json, stdout is the report's alone
        print(f"vswapctl: {message}", file=sys.stderr if args.json else sys.stdout, flush=True)

    # SIGTERM or a closed terminal mid-run: the running target is taken down, as for ^C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        report = bench.bench(cfg, progress)
    except (bench.BenchError, cgroup.CgroupUnavailable, system.CommandFailed) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; the target that was running has been taken down (unless a message above "
                     "says what was left)")
    print(json.dumps(report, indent=1) if args.json else benchreport.format_table(report), flush=True)
    if args.chart:
        try:
            benchreport.write_chart(report, args.chart)
        except (OSError, ValueError) as exc:
            return _fail(f"chart not written: {exc}")
        progress(f"chart written to {args.chart}")
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
    ap.add_argument("--state-dir", type=os.path.abspath,
                    default=os.environ.get("VSWAPFS_STATE_DIR", DEFAULT_STATE_DIR),
                    help=f"where up keeps its state, socket and logs (default {DEFAULT_STATE_DIR}, "
                         "or $VSWAPFS_STATE_DIR); one device per state dir")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the daemons, attach a loop device, mkswap and swapon",
                        description="Start a hoststore (unless --host), mount vswapfs, attach a loop device "
                                    "with direct I/O, mkswap and swapon it.")
    up.add_argument("--size", type=argtype(_page_size), help="device size (K/M/G); needed unless the backing "
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
    up.add_argument("--capacity", type=argtype(_page_size), metavar="SIZE",
                    help="capacity of the hoststore that up starts (default: the device size)")
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

    down = sub.add_parser("down", help="swapoff, losetup -d, unmount, stop what up started",
                          description="Undo `up`, also after a run whose daemons died.  If swapoff fails "
                                      "(ENOMEM: RAM cannot take the swapped pages back), down stops right there "
                                      "and leaves everything running: nothing that serves swap pages is ever "
                                      "stopped, unmounted or detached.  Free memory and run it again.")
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
                                       "nothing this way; SIGTERM does the same.  The drain goes on as long as "
                                       "clients keep taking pages back at an average of at least 256 pages "
                                       "(1 MiB) per the store's --drain-timeout; the store gives up on a client "
                                       "that falls below that, and reports what it dropped.")
    _store_options(drain)
    drain.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="how long to wait for the store's report (default: as long as the drain goes on; the "
                            "store bounds it by a minimum rate, giving up on a client that takes back fewer than "
                            "256 pages per its --drain-timeout)")
    drain.add_argument("--json", action="store_true", help="print the store's report as JSON")
    drain.set_defaults(func=cmd_drain)

    ev = sub.add_parser(
        "evict", help="drop the pages of a client that is away, and free its name",
        description="Drop every page the store holds for client NAME and forget it, so that its name is free "
                    "again (root or the store's own user, on the unix socket; logged, and counted as "
                    "evict_requests and evicted).  A client name belongs to the identity that created it (its "
                    "uid on the unix socket, the token on TCP) and no other identity can take it over, whatever "
                    "it holds: this is how an admin frees one.  Only a client that is away: a connected client "
                    "is refused, since its pages are in use (stop it first; a client that stops cleanly leaves "
                    "nothing behind), and so is one away for less than the store's --away-timeout unless "
                    "--force is given: its link may just have dropped, and it may be on its way "
                    "back.  `vswapctl stats` shows how long each client has been away (away_seconds).  The "
                    "client loses those pages: a vswapfs still running reads them as lost (EIO) when it comes "
                    "back, and the processes whose pages they were get SIGBUS.")
    ev.add_argument("name", metavar="NAME", help="the client's name (`vswapctl stats` lists them under clients)")
    _store_options(ev)
    ev.add_argument("--force", action="store_true",
                    help="evict a client that has been away for less than the store's --away-timeout too")
    ev.add_argument("--json", action="store_true", help="print the store's answer as JSON")
    ev.set_defaults(func=cmd_evict)

    pol = sub.add_parser(
        "policy", help="show or change a running store's admission policy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Without SPEC, show the store's admission policy and limits; with SPEC, change the policy "
                    "now (root or the store's own user only; logged and counted as policy_changes).\n\n"
                    "SPEC: pressure (the watermarks, the default), psi[:HIGH[:LOW]] (on /proc/pressure/memory\n"
                    "some avg10), accept-all, refuse-all, refuse-fraction:P[:SEED], refuse-every:N,\n"
                    "MODULE:CALLABLE or a vswapfs.policies entry point (a plug-in), delay:MS,SPEC.\n"
                    "The store's limits (capacity, quotas, shares) apply to whatever the policy takes.")
    pol.add_argument("spec", nargs="?", metavar="SPEC")
    _store_options(pol)
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=cmd_policy)

    lim = sub.add_parser("limits", help="show or change a running store's capacity, watermarks and quotas",
                         description="Change what is given (root or the store's own user only); show them all.")
    lim.add_argument("--capacity", type=argtype(_page_size), metavar="SIZE")
    lim.add_argument("--high-watermark", type=argtype(percent), metavar="PCT")
    lim.add_argument("--low-watermark", type=argtype(percent), metavar="PCT")
    lim.add_argument("--quota", type=argtype(quota), action="append", default=[], metavar="[NAME=]SIZE",
                     help="a client's quota (NAME=SIZE) or the default one (SIZE); repeatable")
    _store_options(lim)
    lim.add_argument("--json", action="store_true")
    lim.set_defaults(func=cmd_limits)

    tr = sub.add_parser("trace", help="follow the store's decisions as they happen",
                        description="Print the store's admission decisions, hand-backs and invalidations as "
                                    "they happen (root or the store's own user only), until ^C.  Bounded: a "
                                    "reader that falls behind loses the oldest events (and is told how many); "
                                    "the store never waits for it.")
    tr.add_argument("--json", action="store_true", help="one JSON object per line")
    tr.add_argument("--sample", type=argtype(count), default=1,
                    metavar="N", help="every Nth event only (default 1: all)")
    _store_options(tr)
    tr.set_defaults(func=cmd_trace)

    for name, helptext in (("top", "a live view of both daemons, refreshed in place"),
                           ("record", "sample both daemons' counters to a file (JSON lines, or CSV for .csv)")):
        w = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ", every "
                           "INTERVAL seconds until ^C (or COUNT samples); from the device in the state "
                           "directory, or a store alone with --host.")
        if name == "record":
            w.add_argument("file", metavar="FILE")
        w.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default 1")
        w.add_argument("--count", type=argtype(count), metavar="N", help="stop after N samples")
        _store_options(w, host_help="watch this store alone")
        w.set_defaults(func=cmd_top if name == "top" else cmd_record)
    pl = sub.add_parser("plot", help="draw a recording (vswapctl record) as a chart",
                        description="Pages by where they live, and the rates of pages in and out, over time "
                                    "(matplotlib: pip install 'vswapfs[chart]').")
    pl.add_argument("file", metavar="FILE")
    pl.add_argument("-o", "--output", required=True, metavar="OUT.png")
    pl.set_defaults(func=cmd_plot)

    mb = sub.add_parser("microbench", help="the page path without the kernel: pages/s per batch size and transport",
                        description="Write and read batches of 1, 8, 64 and 256 pages through the pager (no "
                                    "FUSE, no swap) and each kind of store: inproc (in this process), a "
                                    "hoststore process on a unix socket with shared page memory, the same "
                                    "without it, and on loopback TCP; report pages per second, 1-page read "
                                    "latency and the per-page cost of the integrity check.")
    mb.add_argument("--seconds", type=float, default=1.0, help="per measurement (default 1)")
    mb.add_argument("--json", action="store_true")
    mb.set_defaults(func=cmd_microbench)

    mem = sub.add_parser("membench", help="memory per page stored in the store, and vswapfs's own RSS",
                         description="Store SIZE of pages from a pager process (a device of DEVICE_SIZE) in a "
                                     "hoststore process, read them back, release them; report the store's "
                                     "resident memory per byte of pages stored and how much of it it gives "
                                     "back, and the pager's resident memory.  Packed runs (swap's clusters), "
                                     "runs spread over the whole device, and packed without shared memory.")
    mem.add_argument("--device-size", type=argtype(_page_size), default=parse_size("4G"),
                     help="the pager's device (a backing file this big is made in /var/tmp; default 4G)")
    mem.add_argument("--size", type=argtype(_page_size), default=parse_size("256M"),
                     help="page data stored (default 256M)")
    mem.add_argument("--json", action="store_true")
    mem.set_defaults(func=cmd_membench)

    from hoststore.tierconfig import TierConfig, parse_prefix, parse_tier

    sw = sub.add_parser("tier-sweep", help="list or delete what stores left in a Redis Cluster page tier",
                        description="Without INSTANCE: list the store instances that have keys in the cluster, "
                                    "with how many, and whether each is running.  With INSTANCE: delete every "
                                    "page key of that store instance.  A store deletes its own keys when it "
                                    "exits; a store that was killed leaves them (its clients lost those pages "
                                    "with it).  A running store keeps a heartbeat key on every master, which "
                                    "outlives its last rewrite by the store's --tier-heartbeat-ttl "
                                    f"({TierConfig.heartbeat_ttl:g} s by default): while any master holds one, "
                                    "the instance is listed as running and deleting its keys is refused; so is "
                                    "any sweep while a master does not answer.")
    sw.add_argument("tier", type=argtype(parse_tier), metavar="redis-cluster://HOST:PORT[,...]")
    sw.add_argument("instance", nargs="?", type=argtype(_instance), metavar="INSTANCE",
                    help="the store instance whose keys to delete (16 hex digits, as listed)")
    sw.add_argument("--prefix", type=argtype(parse_prefix), default="vswap",
                    help="the stores' --tier-prefix (default vswap)")
    sw.set_defaults(func=cmd_tier_sweep)

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

    from . import bench as benchlib
    from . import benchreport

    bench = sub.add_parser(
        "bench", help="the workload through zram, a loop device and vswapfs: medians and ratios",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the verifying workload (SIZE of memory in a memory cgroup of LIMIT, so most of it is\n"
                    "swapped) through each target, RUNS times, interleaved (zram loop inproc ... zram loop ...),\n"
                    "each target set up fresh for every run and taken down after it.  Reports each phase's\n"
                    "median: fill (swap-out), sequential verify and random verify (swap-in), in seconds, and\n"
                    "the ratios to zram and to inproc.  Needs root.\n\n"
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
    bench.add_argument("--size", type=argtype(_page_size), default=parse_size("256M"),
                       help="the workload's memory (default 256M)")
    bench.add_argument("--limit", type=argtype(_page_size), default=parse_size("64M"),
                       help="its memory cgroup's limit (default 64M)")
    bench.add_argument("--device-size", type=argtype(_page_size), default=parse_size("512M"),
                       help="every target's size, and the store capacity of inproc and hoststore (default 512M)")
    bench.add_argument("--small-capacity", type=argtype(_page_size), metavar="SIZE",
                       help="hoststore-small's store capacity, below --size (default: a quarter of --size)")
    bench.add_argument("--targets", type=argtype(benchlib.parse_targets), metavar="LIST",
                       help=f"comma-separated, run in this order (default: {','.join(benchlib.TARGETS)}, "
                            "zram only where there is one)")
    bench.add_argument("--data", choices=benchlib.DATA_KINDS, default="incompressible",
                       help="page contents: incompressible (default; random, no page compresses) or "
                            "compressible (one 16-byte pattern per page)")
    bench.add_argument("--runs", type=argtype(benchlib.parse_runs), default=benchlib.MIN_RUNS, metavar="N",
                       help=f"runs per target, at least {benchlib.MIN_RUNS}; medians are reported (default "
                            f"{benchlib.MIN_RUNS})")
    bench.add_argument("--json", action="store_true",
                       help="print the report as JSON (progress goes to stderr)")
    bench.add_argument("--chart", type=argtype(benchreport.chart_path), metavar="FILE.png",
                       help="also draw the medians as grouped bars (.png, .svg or .pdf); needs matplotlib: "
                            "pip install 'vswapfs[chart]'")
    bench.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
