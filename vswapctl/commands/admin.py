"""A running store's administration: ``drain``, ``evict``, ``policy``, ``limits`` and ``tier-sweep``."""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any


from vswapcommon.cliutil import argtype, percent, quota
from pagewire.messages import PAGE_SIZE, Drain
from vswapcommon.sizes import format_size


from .common import fail, page_size, say, store_options, store_target, table


def _configure(args: argparse.Namespace, message: Any, what: str) -> int:
    from pagewire.auth import TokenError
    from vswapfs.hostclient import StoreError, StoreUnavailable

    target = store_target(args, f"{what} needs one")
    if isinstance(target, str):
        return fail(target)
    try:
        answer = target.ask(message)
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return fail(f"{what} at {target.address}: {exc}")
    if args.json:
        print(json.dumps(answer, indent=1, sort_keys=True))
        return 0
    quotas = ", ".join(f"{k} {format_size(v * PAGE_SIZE)}" for k, v in sorted(answer["quotas"].items())) or "none"
    default = "none" if answer["quota_pages"] is None else format_size(answer["quota_pages"] * PAGE_SIZE)
    table([("policy", answer["policy"]),
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


def cmd_drain(args: argparse.Namespace) -> int:
    """Ask a hoststore to hand every page back to its clients and exit."""
    from pagewire.auth import TokenError
    from vswapfs.hostclient import StoreError, StoreUnavailable

    target = store_target(args, "its pages leave vswapfs's memory as swapoff reads them back (`vswapctl down`)")
    if isinstance(target, str):
        return fail(target)
    address = target.address
    say(f"draining the host store at {address}: it hands every page back to its clients, then exits")
    try:
        report = target.ask(Drain(), wait=args.timeout if args.timeout is not None else math.inf)
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return fail(f"drain of {address} failed: {exc}")
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
        return fail(f"NAME: {exc}")
    target = store_target(args, "its only client is vswapfs itself")
    if isinstance(target, str):
        return fail(target)
    try:
        answer = target.ask(Evict(args.name, args.force))
    except (StoreUnavailable, StoreError, OSError, TokenError) as exc:
        return fail(f"evict of {args.name!r} at {target.address}: {exc}")
    if args.json:
        print(json.dumps(answer, indent=1, sort_keys=True))
    else:
        say(f"evicted client {answer['client']!r}: dropped {answer['dropped']} pages "
            f"({format_size(answer['dropped'] * PAGE_SIZE)}); its name is free")
    return 0


def _instance(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", text):
        raise ValueError(f"{text!r} is not a store instance (16 hex digits, as `vswapctl tier-sweep URL` lists)")
    return text


def _liveness(heartbeat: dict[str, object] | None) -> str:
    """How tier-sweep shows a store instance: running (its heartbeat says where), or gone."""
    if heartbeat is None:
        return "gone (no heartbeat): tier-sweep may delete its keys"
    where = ", ".join(f"{k} {heartbeat[k]}" for k in ("host", "pid") if k in heartbeat)
    return f"running ({where or 'a heartbeat'})"


def cmd_tier_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hoststore.redistier import TierUnavailable, connect
    from hoststore.tierpresence import Presence

    config = replace(args.tier, prefix=args.prefix)
    try:
        tier = connect(config, args.instance or "")
        presence = Presence(tier)
        try:
            if not args.instance:
                found = presence.instances()
                if not found:
                    say(f"no keys under {args.prefix}: in {config}")
                for instance, entry in sorted(found.items()):
                    print(f"{instance}  {entry.keys} keys  {_liveness(entry.heartbeat)}")
                return 0
            # Asked of every master (one that does not answer is an error): a running store
            # has a heartbeat on each, so one failover cannot hide it.
            entry = presence.instances(args.instance).get(args.instance)
            if entry is not None and entry.heartbeat is not None:
                ttl = entry.heartbeat.get("ttl")
                after = f"{ttl:g} s" if isinstance(ttl, int | float) else "its TTL"
                return fail(f"store instance {args.instance} is {_liveness(entry.heartbeat)}: its keys hold its "
                             "clients' pages, and tier-sweep deletes only what a store that is gone left (its "
                             f"heartbeat expires {after} after it stops)")
            deleted = presence.sweep()
        finally:
            presence.close()
            tier.close()
    except TierUnavailable as exc:
        return fail(str(exc))
    say(f"deleted {deleted} keys of store instance {args.instance}")
    return 0


def register(sub: Any) -> None:
    """Add this group's commands to ``vswapctl``'s subparsers."""
    _add_drain(sub)
    _add_evict(sub)
    _add_policy(sub)
    _add_limits(sub)
    _add_tier_sweep(sub)


def _add_drain(sub: Any) -> None:
    drain = sub.add_parser("drain", help="make the host store hand every page back and exit",
                           description="Ask the host store (the one `up` started, or --host) to stop admitting "
                                       "pages, hand every page back to its clients (they write them to their "
                                       "backing files), and exit.  A planned restart of the store loses "
                                       "nothing this way; SIGTERM does the same.  The drain goes on as long as "
                                       "clients keep taking pages back at an average of at least 256 pages "
                                       "(1 MiB) per the store's --drain-timeout; the store gives up on a client "
                                       "that falls below that, and reports what it dropped.")
    store_options(drain)
    drain.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="how long to wait for the store's report (default: as long as the drain goes on; the "
                            "store bounds it by a minimum rate, giving up on a client that takes back fewer than "
                            "256 pages per its --drain-timeout)")
    drain.add_argument("--json", action="store_true", help="print the store's report as JSON")
    drain.set_defaults(func=cmd_drain)


def _add_evict(sub: Any) -> None:
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
    store_options(ev)
    ev.add_argument("--force", action="store_true",
                    help="evict a client that has been away for less than the store's --away-timeout too")
    ev.add_argument("--json", action="store_true", help="print the store's answer as JSON")
    ev.set_defaults(func=cmd_evict)


def _add_policy(sub: Any) -> None:
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
    store_options(pol)
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=cmd_policy)


def _add_limits(sub: Any) -> None:
    lim = sub.add_parser("limits", help="show or change a running store's capacity, watermarks and quotas",
                         description="Change what is given (root or the store's own user only); show them all.")
    lim.add_argument("--capacity", type=argtype(page_size), metavar="SIZE")
    lim.add_argument("--high-watermark", type=argtype(percent), metavar="PCT")
    lim.add_argument("--low-watermark", type=argtype(percent), metavar="PCT")
    lim.add_argument("--quota", type=argtype(quota), action="append", default=[], metavar="[NAME=]SIZE",
                     help="a client's quota (NAME=SIZE) or the default one (SIZE); repeatable")
    store_options(lim)
    lim.add_argument("--json", action="store_true")
    lim.set_defaults(func=cmd_limits)


def _add_tier_sweep(sub: Any) -> None:
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
