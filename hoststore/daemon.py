"""``hoststore``: the daemon keeping accepted swap pages in RAM."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from dataclasses import replace

import trio

from types import MappingProxyType

from pagewire.access import INSECURE_TCP_GIVES_UP, Access, AccessError, check_listener, check_tcp_options
from pagewire.address import Address, parse_address
from pagewire.auth import TokenError, load_token
from pagewire.codec import COMPRESS_CHOICES, add_compress_arguments, recompress_problem
from vswapcommon.cliutil import argtype, count, percent, positive, quota
from vswapcommon.hardening import harden
from vswapcommon.logsetup import OUTPUT, setup_logging
from vswapcommon import metrics
from .compressor import idle_from_args
from .policies import Policy, parse_policy
from .policy import DEFAULT_MAX_DEVICE_SIZE, Limits
from pagewire.messages import MAX_GET_PAGES, MAX_PUT_PAGES, PAGE_SIZE
from .pressure import Sampler, parse_source, read_psi, sample
from .redistier import TierUnavailable, connect
from .tierconfig import HEARTBEATS_PER_TTL, TierConfig, parse_heartbeat_ttl, parse_prefix, parse_tier
from .pools import POOLS, pool_limit
from .storemetrics import store_families
from pagewire.endpoint import RECEIVE_SIZE, SEND_BATCH_BYTES
from pagewire.protocol import get_answer_size
from .server import Server, ServerConfig, fmt_pages, open_listener
from vswapcommon.sizes import format_size, parse_size
from .store import DEFAULT_AWAY_TIMEOUT, Store
from .tierbackend import tiered_store

log = logging.getLogger("hoststore")

# The least --max-in-flight that serves anyone: the most one connection holds at once,
# a read of the largest message coming in (a put) and a write of answers going out
# (answers are sent once they pass SEND_BATCH_BYTES: that, and one more get answer).
# The store's own hand-backs count against a budget of their own (pagewire.endpoint).
LEAST_IN_FLIGHT = RECEIVE_SIZE + SEND_BATCH_BYTES + get_answer_size(MAX_GET_PAGES)

DESCRIPTION = """\
Keep swap pages offered by vswapfs clients in RAM, accepting or refusing each
page by memory pressure (with a high and a low watermark), a hard capacity and
an optional per-client quota.  Refused pages are written to the client's
backing file, so refusing is always safe.
"""

EPILOG = f"""\
examples:
  hoststore --listen unix:/run/vswapfs/host.sock --capacity 2G
  hoststore --listen unix:/run/vswapfs/host.sock --listen tcp:127.0.0.1:7070 --token-file /etc/vswapfs/token \\
            --capacity 512M --quota 256M --quota vm1=1G --weight vm1=2
  hoststore --listen tcp:0.0.0.0:7070 --token-file /etc/vswapfs/token --capacity 8G

Who may connect: on a unix socket, root and this daemon's user (and the uids
named by --allow-uid), checked by the kernel's peer credentials; the socket's
directory must be writable by nobody else (it is made 0700 if missing).  On
TCP, with --token-file, both ends prove at hello that they hold the token, so
a client also knows it reached the real store.  TCP without a token is refused
unless --insecure-tcp accepts it, and then on loopback addresses only.  The
token does not encrypt: across a network others can watch, tunnel the
connection (ssh, WireGuard).

A client name belongs to the identity that created it: its uid on the unix
socket, on TCP the token (or, with --insecure-tcp, every tokenless peer as
one).  Another identity can never take it over; `vswapctl evict NAME` (root or
this daemon's user) drops the pages of a client that is away, and frees its
name.

Connection budgets: every connection counts in one pool, each with its own
limit (--max-connections POOL=N), so that no kind of peer can crowd out
another: admin (root and this daemon's user on the unix socket), unix (other
unix-socket users), tcp (TCP peers past hello; with a token, those that proved
it) and hello (connections that have not said hello yet; when it is full the
oldest goes for the newest).  Loopback TCP counts as one host, whatever 127.x
address it uses.  What peers can make the store hold while it waits for the
rest of their messages is capped too: a put carries at most {format_size(MAX_PUT_PAGES * PAGE_SIZE)}
(clients split larger writes), a message begun must be finished within
--frame-timeout, and past --max-in-flight for the connections of one pool
the ones that kept the store waiting longest (over --shed-after) are closed.
"""


def _weight(text: str) -> tuple[str, float]:
    name, sep, weight = text.rpartition("=")
    if not sep or not name:
        raise ValueError(f"weight {text!r} is not NAME=W")
    return name, positive(weight)



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hoststore",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--listen", action="append", type=argtype(parse_address), required=True, metavar="ADDR",
                    help="unix:PATH or tcp:HOST:PORT; repeat to listen on several")
    _add_capacity_arguments(ap)
    _add_access_arguments(ap)
    _add_connection_arguments(ap)
    _add_admission_arguments(ap)
    _add_handback_arguments(ap)
    _add_tier_arguments(ap)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def _add_capacity_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--capacity", type=argtype(parse_size), default=parse_size("1G"), metavar="SIZE",
                    help="most page data held for all clients together (K/M/G suffixes; default 1G)")
    add_compress_arguments(ap)
    ap.add_argument("--quota", type=argtype(quota), action="append", default=[], metavar="[NAME=]SIZE",
                    help="most page data held for client NAME, or without NAME for any client that has no "
                         "quota of its own (default: no quota); repeat for several clients")
    ap.add_argument("--weight", type=argtype(_weight), action="append", default=[], metavar="NAME=W",
                    help="client NAME's weight (default 1): once the store is 90%% full, a client holding its "
                         "weighted share of the capacity gets no more pages, and under pressure clients above "
                         "their share hand pages back first")


def _add_access_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--token-file", metavar="PATH",
                    help="a shared secret (at least 16 bytes, mode 0600) that clients must prove they hold, "
                         "and that this store proves back; needed to listen on TCP (but see --insecure-tcp)")
    ap.add_argument("--insecure-tcp", action="store_true",
                    help="accept tcp: listeners without --token-file, on loopback addresses only, giving up "
                         f"what the token proves: {INSECURE_TCP_GIVES_UP}")
    ap.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                    help="let this uid connect to the unix socket too (root and our own user always may); "
                         "repeat for several")
    ap.add_argument("--max-connections", type=argtype(pool_limit), action="append", default=[],
                    metavar="POOL=N",
                    help="at most N connections in POOL; repeat for several pools.  Pools (default): " +
                         "; ".join(f"{pool} ({rule.default}): {rule.who}" for pool, rule in POOLS.items()) +
                         ".  Beyond its limit a new connection is closed at once (a TCP one at its hello)")
    ap.add_argument("--max-connections-per-peer", type=argtype(count),
                    default=ServerConfig.max_connections_per_peer, metavar="N",
                    help="at most N connections per uid (unix socket) or host (TCP; every loopback address is "
                         "one host, an IPv6 /64 is one host), and apart from those N, N of a host's TCP "
                         "connections that have not said hello yet (default %(default)s)")
    ap.add_argument("--max-clients", type=argtype(count), default=1024, metavar="N",
                    help="client names kept at once; names away and holding no page are forgotten to make "
                         "room, and beyond that new names are refused (default 1024)")


def _add_connection_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--connection-rate", type=argtype(positive), default=ServerConfig.connection_rate,
                    metavar="N",
                    help="new connections per second per uid or host, in bursts of up to 2N; more are "
                         "closed at once.  A host's TCP connections have a rate for their connecting and "
                         "another once their hello succeeded (a token holder's are not spent by tokenless "
                         "peers on its host); over the first, one is still let in while the hello pool has "
                         "room (default %(default)g)")
    ap.add_argument("--hello-timeout", type=argtype(positive), default=ServerConfig.hello_timeout,
                    metavar="SECONDS",
                    help="close a connection that has not said hello within this long (default %(default)g)")
    ap.add_argument("--frame-timeout", type=argtype(positive), default=ServerConfig.frame_timeout,
                    metavar="SECONDS",
                    help="close a connection that began a message and has not sent the rest of it after this "
                         "long of waiting for it (default %(default)g)")
    ap.add_argument("--max-in-flight", type=argtype(parse_size), default=ServerConfig.max_in_flight,
                    metavar="SIZE",
                    help="bytes that the connections of one pool together may make the store hold while it "
                         "waits for their peers: the start of a message not finished, answers not yet taken "
                         "(the store's own hand-backs have a budget as large of their own); beyond it, the "
                         "connections whose peers have kept it waiting longest, over --shed-after, are closed "
                         f"(default {format_size(ServerConfig.max_in_flight)} per pool; a connection holds at most one "
                         f"read coming in and {format_size(SEND_BATCH_BYTES)} of answers and one more going out: "
                         f"{LEAST_IN_FLIGHT} bytes is the least allowed)")
    ap.add_argument("--shed-after", type=argtype(positive), default=ServerConfig.shed_after, metavar="SECONDS",
                    help="past --max-in-flight, close only connections whose peers have kept the store waiting "
                         "this long (for the rest of a message, or to take answers): a peer reading promptly "
                         "is never closed for it (default %(default)g)")
    ap.add_argument("--idle-timeout", type=argtype(positive), default=300.0, metavar="SECONDS",
                    help="close a connection silent for this long (default 300; vswapfs keeps its own alive)")


def _add_admission_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--policy", type=argtype(_policy), default=None, metavar="SPEC",
                    help="admission policy (default pressure): pressure, psi[:HIGH[:LOW]], accept-all, refuse-all, "
                         "refuse-fraction:P[:SEED], refuse-every:N, MODULE:CALLABLE, a name under the "
                         "vswapfs.policies entry points, or delay:MS,SPEC; the limits still apply.  `vswapctl "
                         "policy SPEC` changes it at run time")
    ap.add_argument("--metrics", type=argtype(metrics.parse_metrics_address), metavar="[HOST:]PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; "
                         "anyone who can reach it sees every client's counters)")
    ap.add_argument("--high-watermark", type=argtype(percent), default=90.0, metavar="PCT",
                    help="refuse pages once used memory reaches PCT%% of RAM (default 90)")
    ap.add_argument("--low-watermark", type=argtype(percent), default=80.0, metavar="PCT",
                    help="after refusing, accept again once used memory falls to PCT%% (default 80)")
    ap.add_argument("--pressure-interval", type=float, default=0.005, metavar="SECONDS",
                    help="read memory pressure at most this often (default 0.005)")
    ap.add_argument("--pressure-source", type=argtype(parse_source), metavar="SOURCE",
                    help="where memory pressure comes from: psutil (this machine, the default) or file:PATH "
                         "(a used-memory percentage read from PATH, for experiments and tests); with --tier, "
                         "the cluster's memory")
    ap.add_argument("--max-device-size", type=argtype(parse_size), default=DEFAULT_MAX_DEVICE_SIZE,
                    metavar="SIZE", help="refuse clients whose device is larger (default 16T)")


def _add_handback_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--handback-rate", type=argtype(parse_size), default=100 << 20, metavar="SIZE",
                    help="under pressure, hand pages back to their clients at most this fast, per second "
                         "(default 100M)")
    ap.add_argument("--drain-timeout", type=argtype(positive), default=ServerConfig.drain_timeout,
                    metavar="SECONDS",
                    help="on SIGTERM/SIGINT or `vswapctl drain`, the drain's minimum rate: it waits for a client "
                         "while it takes its pages back at an average of at least 256 pages (1 MiB) per SECONDS "
                         "(each page taken moves its deadline SECONDS/256 on, to at most SECONDS ahead; pages "
                         "answered FAILED earn nothing).  A client that is away gets SECONDS from the drain's "
                         "start to come back, and SECONDS from its first return.  A drain lasts at most "
                         "2*SECONDS plus SECONDS per 256 pages of the client holding most "
                         "(default %(default)g)")
    ap.add_argument("--away-timeout", type=argtype(positive), default=DEFAULT_AWAY_TIMEOUT, metavar="SECONDS",
                    help="a client that disconnected keeps its pages this long against a new instance of the "
                         "same identity under its name (a restarted vswapfs: same uid, or the token on TCP), "
                         "which then replaces it (default 300).  Its own reconnect is always accepted, and "
                         "another identity never gets the name (see `vswapctl evict`)")


def _add_tier_arguments(ap: argparse.ArgumentParser) -> None:
    tier = ap.add_argument_group(
        "page tier", "keep page data in a Redis Cluster instead of this machine's memory (see the README, "
        "'A page tier on Redis Cluster'); admission then follows the masters' memory (used_memory against "
        "maxmemory) with the same watermarks")
    tier.add_argument("--tier", type=argtype(parse_tier), metavar="redis-cluster://HOST:PORT[,HOST:PORT...]",
                      help="the cluster's nodes (any of them; the rest are found); nodes should run with "
                           "maxmemory, maxmemory-policy noeviction and a replica each")
    tier.add_argument("--tier-replicas", type=argtype(count), default=1, metavar="N",
                      help="a page is stored only once N replicas acknowledged it (default 1)")
    tier.add_argument("--tier-wait-timeout", type=argtype(positive), default=0.5, metavar="SECONDS",
                      help="how long a write waits for the replicas; pages not acknowledged by then are refused "
                           "and go to the client's backing file (default 0.5)")
    tier.add_argument("--tier-read-timeout", type=argtype(positive), default=20.0, metavar="SECONDS",
                      help="how long a read keeps asking while a node is down (a failover takes a few seconds; "
                           "keep it below vswapfs --read-timeout, 30 by default) (default 20)")
    tier.add_argument("--tier-prefix", type=argtype(parse_prefix), default="vswap", metavar="PREFIX",
                      help="the start of every key the store writes (default vswap)")
    tier.add_argument("--tier-heartbeat-ttl", type=argtype(parse_heartbeat_ttl),
                      default=TierConfig.heartbeat_ttl, metavar="SECONDS",
                      help="the store keeps a heartbeat key on every master, rewritten %d times within this TTL; "
                           "`vswapctl tier-sweep` deletes a store's keys only once it has expired on all of "
                           "them (default %%(default)g)" % HEARTBEATS_PER_TTL)


def limits_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Limits:
    if args.low_watermark > args.high_watermark:
        ap.error(f"--low-watermark {args.low_watermark} is above --high-watermark {args.high_watermark}")
    if args.capacity % PAGE_SIZE:
        ap.error(f"--capacity {args.capacity} is not a multiple of {PAGE_SIZE}")
    if args.pressure_interval < 0:
        ap.error("--pressure-interval must not be negative")
    defaults = [size for name, size in args.quota if name is None]
    if len(defaults) > 1:
        ap.error("--quota SIZE (the default quota) is given more than once")
    return Limits(
        high_percent=args.high_watermark,
        low_percent=args.low_watermark,
        capacity_pages=args.capacity // PAGE_SIZE,
        quota_pages=defaults[0] // PAGE_SIZE if defaults else None,
        max_device_size=args.max_device_size,
        quotas=MappingProxyType({name: size // PAGE_SIZE for name, size in args.quota if name is not None}),
        weights=MappingProxyType(dict(args.weight)),
    )


def config_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> ServerConfig:
    """The server's limits; one frame must fit in --max-in-flight, and each pool is named once."""
    pools = [pool for pool, _ in args.max_connections]
    twice = sorted({pool for pool in pools if pools.count(pool) > 1})
    if twice:
        ap.error(f"--max-connections gives pool {', '.join(twice)} more than once")
    if args.max_in_flight < LEAST_IN_FLIGHT:
        ap.error(f"--max-in-flight {args.max_in_flight} is below what one connection may hold "
                 f"({LEAST_IN_FLIGHT} bytes): a client putting and reading the most it may would be closed")
    return ServerConfig(
        handback_rate=args.handback_rate / PAGE_SIZE, drain_timeout=args.drain_timeout,
        max_connections=MappingProxyType(dict(args.max_connections)),
        max_connections_per_peer=args.max_connections_per_peer,
        hello_timeout=args.hello_timeout, idle_timeout=args.idle_timeout, connection_rate=args.connection_rate,
        frame_timeout=args.frame_timeout, max_in_flight=args.max_in_flight, shed_after=args.shed_after,
    )


def access_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Access:
    """Who may connect; refuses, before anything is bound, a listener open to strangers."""
    token = None
    if args.token_file:
        try:
            token = load_token(args.token_file)
        except TokenError as exc:
            ap.error(str(exc))
    if any(uid < 0 for uid in args.allow_uid):
        ap.error("--allow-uid takes a uid (a number of 0 or more)")
    problem = check_tcp_options(args.listen, token is not None, args.insecure_tcp)
    if problem is not None:
        ap.error(problem)
    access = Access(token, frozenset(args.allow_uid), args.insecure_tcp)
    for address in args.listen:
        if address.kind == "unix":
            make_socket_dir(os.path.dirname(os.path.abspath(address.path)), access)
        try:
            check_listener(address, access)
        except AccessError as exc:
            ap.error(str(exc))
    return access


def make_socket_dir(directory: str, access: Access) -> None:
    """Create a missing socket directory, private (0700, or 0711 when others may connect)."""
    if not os.path.exists(directory):
        try:
            os.makedirs(directory, mode=0o711 if access.allowed_uids else 0o700)
        except OSError:
            pass  # check_listener names the problem


async def run(addresses: list[Address], server: Server, metrics_at: tuple[str, int] | None = None) -> None:
    """Serve until a drain finishes.  The first SIGTERM/SIGINT starts the drain;
    a second one exits at once, saying which pages it drops."""
    try:  # before any task starts: a failure here is one line, not a traceback
        listeners = [await open_listener(a, server.access) for a in addresses]
    except OSError as exc:
        raise SystemExit(f"hoststore: error: cannot listen: {exc.strerror or exc}") from None
    store = server.store
    try:
        async with trio.open_nursery() as upkeep:
            await upkeep.start(store.run, server)  # the page backend's (a tier's heartbeat, deletes)
            await _serve(addresses, listeners, server, metrics_at)
            upkeep.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def _serve(addresses: list[Address], listeners: list[trio.SocketListener], server: Server,
                 metrics_at: tuple[str, int] | None) -> None:
    # Our socket files, by inode: at exit, remove them only if no newer daemon took the path.
    ours = {a.path: os.stat(a.path).st_ino for a in addresses if a.kind == "unix"}
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    draining = False
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not draining:
                            draining = True
                            log.info("%s: draining (send it again to exit at once, dropping what is left)", name)
                            nursery.start_soon(server.drain)
                            continue
                        dropped = server.dropped_now()
                        for client, n in dropped.items():
                            log.error("%s again: exiting at once, DROPPING %s of client %r", name,
                                      fmt_pages(n), client)
                        if not dropped:
                            log.info("%s again: exiting at once; nothing is left to drop", name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
                if metrics_at is not None:
                    try:
                        snapshot = metrics.start(metrics_at, store_families)
                    except OSError as exc:
                        raise SystemExit(f"hoststore: error: --metrics {metrics_at[0]}:{metrics_at[1]}: "
                                         f"{exc.strerror or exc}") from None
                    nursery.start_soon(metrics.publish_forever, snapshot, lambda: server.store.stats(admin=True))
                    log.info("metrics on http://%s:%d/metrics", *metrics_at)
                await server.serve(listeners)  # returns once a drain has finished
                nursery.cancel_scope.cancel()
    finally:
        for path, ino in ours.items():
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass


def _policy(text: str) -> str:
    parse_policy(text, psi_available=lambda: read_psi() is not None)  # PolicyError: what is wrong, at once
    return text


def raise_fd_limit(wanted: int) -> None:
    """Each client with shared page memory holds 4 file descriptors here (two memfds,
    and the duplicates mmap keeps); with every connection, that can pass a soft limit
    of 1024.  Raised towards the hard limit; said if that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit %d is below the %d that --max-connections and --max-clients may need",
                    soft, wanted)


def build_store(ap: argparse.ArgumentParser, args: argparse.Namespace, limits: Limits, policy: Policy | None
                ) -> Store:
    """The store: pages in our memory, or in the cluster of --tier (reached now: a
    cluster that cannot be reached is an error before anything listens)."""
    options = dict(away_timeout=args.away_timeout, max_clients=args.max_clients, policy=policy)
    problem = recompress_problem(args)
    if problem:
        ap.error(problem)
    if args.tier is None:
        return Store(limits, Sampler(args.pressure_interval, source=args.pressure_source or sample), **options,
                     compress=COMPRESS_CHOICES[args.compress], idle=idle_from_args(args))
    if args.pressure_source is not None:
        ap.error("--pressure-source does not go with --tier: the cluster's memory is the pressure")
    config = replace(args.tier, replicas=args.tier_replicas, wait_timeout=args.tier_wait_timeout,
                     read_timeout=args.tier_read_timeout, prefix=args.tier_prefix,
                     heartbeat_ttl=args.tier_heartbeat_ttl)
    try:
        tier = connect(config)
    except TierUnavailable as exc:
        raise SystemExit(f"hoststore: error: --tier: {exc}") from None
    if args.recompress_after:
        ap.error("--recompress-after does not go with --tier: idle pages are recompressed in the store's memory")
    store = tiered_store(limits, tier, **options, compress=COMPRESS_CHOICES[args.compress])
    log.info("pages go to the cluster at %s (%d masters; a replica must acknowledge each write within %gs)",
             config, len(tier.memory), config.wait_timeout)
    return store


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    limits = limits_from_args(ap, args)
    config = config_from_args(ap, args)
    access = access_from_args(ap, args)
    setup_logging(args.verbose, "hoststore")
    OUTPUT.start()  # from here on, nothing waits for the log file
    unhardened = harden(log)
    raise_fd_limit(sum(config.max_connections.get(pool, rule.default) for pool, rule in POOLS.items())
                   + 4 * args.max_clients + 64)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal must not take the pages with it
    policy = parse_policy(args.policy, psi_available=lambda: read_psi() is not None) if args.policy else None
    store = build_store(ap, args, limits, policy)
    store.pressure_risks = unhardened
    server = Server(store, config, access)
    try:
        trio.run(run, args.listen, server, args.metrics)
    except BaseExceptionGroup as group:  # an exit asked for from inside a task: its one line, no traceback
        exits, rest = group.split(SystemExit)
        if exits is None or rest is not None:
            raise
        raise _first_leaf(exits) from None
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
