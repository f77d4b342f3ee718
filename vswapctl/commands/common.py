"""What the command groups share: messages, the store a command talks to, reading both daemons' stats."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from functools import partial
from typing import Any

import trio

from pagewire.access import INSECURE_TCP_GIVES_UP, check_tcp_options
from pagewire.address import INPROC, Address, parse_address
from vswapcommon.cliutil import argtype
from pagewire.messages import PAGE_SIZE, Stats
from vswapcommon.sizes import parse_size

from ..state import State



CONTROL_TIMEOUT = 2.0


def say(message: str) -> None:
    print(f"vswapctl: {message}", flush=True)


def fail(message: str) -> int:
    print(f"vswapctl: error: {message}", file=sys.stderr)
    return 1


def page_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{text} is not a positive multiple of {PAGE_SIZE} bytes")
    return size


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def need_state(args: argparse.Namespace) -> State:
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


def table(rows: list[tuple[str, Any]], indent: str = "") -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{indent}{key:<{width}}  {value}")


WITH_HOST_ONLY = "--token-file and --insecure-tcp go with --host; the device's store is reached as `up` was told"


def store_target(args: argparse.Namespace, inproc: str) -> StoreTarget | str:
    """The store a command talks to: --host (with --token-file or --insecure-tcp), or
    the device's in the state directory, reached as `up` was told to.  A str says
    why not (``inproc``: what to say of a device without a store daemon)."""
    if args.host is not None:
        target = StoreTarget(args.host, args.token_file or "", args.insecure_tcp)
    elif args.token_file or args.insecure_tcp:
        return WITH_HOST_ONLY
    else:
        state = need_state(args)
        if state.host == INPROC:
            return f"this device has no store daemon (--host inproc): {inproc}"
        target = StoreTarget.of(state)
    return check_tcp_options([target.address], bool(target.token_file), target.insecure_tcp) or target


def store_options(parser: argparse.ArgumentParser, host_help: str = "the store's address (default: the one "
                   "in the state directory)") -> None:
    """--host, and how to reach a store there: the same for every command that asks one."""
    parser.add_argument("--host", type=argtype(parse_address), metavar="ADDR", help=host_help)
    parser.add_argument("--token-file", metavar="PATH",
                        help="with --host: the store's token (mode 0600), proven both ways at hello (default: "
                             "the device's store uses the token `up` was given)")
    parser.add_argument("--insecure-tcp", action="store_true",
                        help="with --host tcp:HOST:PORT on loopback: ask without a token, giving up what it "
                             f"proves: {INSECURE_TCP_GIVES_UP}")
