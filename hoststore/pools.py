"""Connection budgets that one kind of peer cannot exhaust for another.

Every connection the store keeps counts in exactly one pool, each with its own
limit (``hoststore --max-connections POOL=N``):

* ``admin``: unix-socket peers that are root or the store's own user (vswapfs,
  ``vswapctl stats``, ``drain``); the kernel names the uid at accept.
* ``unix``: other unix-socket peers that ``--allow-uid`` lets in.
* ``tcp``: TCP peers past their hello (with ``--token-file``: peers that
  proved the token).
* ``hello``: connections that have not proved anything yet: TCP before its
  hello, and unix-socket uids that are not allowed (refused at their hello).

A TCP connection starts in ``hello`` and moves to ``tcp`` when its hello
succeeds; if ``tcp`` is full, that hello is refused.  The ``hello`` pool is
small and never refuses a newcomer within its host's connection rate: when it
is full, its oldest member is closed instead, so connections that never say
hello cannot keep a good client from getting as far as its own (which takes a
round trip).  Nothing on TCP counts against ``admin`` or ``unix``, and no
unauthenticated peer against ``tcp``.

The per-peer limits (``--connection-rate``, ``--max-connections-per-peer``)
count a TCP host's connections not past hello apart from those that are
(pagewire.access.before_hello): a good hello moves the connection to its
host's own count, charged to its host's own rate then, and gives back what its
connecting took.  Over its rate, a connection not past hello is still let in
while the hello pool has room (it evicts no one), so a tokenless flood from the
same host or NAT address cannot keep a token holder out of it.  Each pool has
its own budget for bytes in flight, too (pagewire.endpoint.InFlight).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from pagewire.access import Access
from vswapcommon.cliutil import count
from vswapcommon.counters import Counters
from .hostcounters import HostCounter


class Pool(enum.StrEnum):
    ADMIN = "admin"
    UNIX = "unix"
    TCP = "tcp"
    HELLO = "hello"


@dataclass(frozen=True)
class PoolRule:
    default: int  # connections
    who: str  # for --help and the logs
    full: HostCounter  # counted each time the pool is found full
    evicts: bool = False  # when full, close the oldest member for the newcomer (else refuse the newcomer)


POOLS: Mapping[Pool, PoolRule] = MappingProxyType({
    Pool.ADMIN: PoolRule(64, "unix-socket peers that are root or the store's own user",
                         HostCounter.REFUSED_ADMIN_CONNECTIONS),
    Pool.UNIX: PoolRule(64, "other unix-socket peers (--allow-uid)", HostCounter.REFUSED_UNIX_CONNECTIONS),
    Pool.TCP: PoolRule(256, "TCP peers past their hello (with --token-file: that proved the token)",
                       HostCounter.REFUSED_TCP_CONNECTIONS),
    Pool.HELLO: PoolRule(32, "connections that have not said hello yet (TCP, and unix-socket uids not "
                         "allowed); when full, the oldest is closed for the newest", HostCounter.CLOSED_HELLO_POOL,
                         evicts=True),
})


def first_pool(uid: int | None, access: Access) -> Pool:
    """The pool a new connection starts in: a unix-socket peer's uid is known at once,
    a TCP peer proves itself at hello."""
    if uid is None or not access.uid_allowed(uid):
        return Pool.HELLO
    return Pool.ADMIN if access.is_admin(uid) else Pool.UNIX


def pool_limit(text: str) -> tuple[Pool, int]:
    """``POOL=N`` (``--max-connections``); ValueError names the problem."""
    name, sep, number = text.partition("=")
    names = ", ".join(POOLS)
    if not sep:
        raise ValueError(f"give POOL=N, one pool at a time ({names}), not {text!r}")
    try:
        pool = Pool(name)
    except ValueError:
        raise ValueError(f"unknown connection pool {name!r} (pools: {names})") from None
    try:
        return pool, count(number)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (a pool holds at least 1 connection)") from None


class Member(Protocol):
    def evict(self) -> None:
        """Closed for a newer connection of a full evicting pool: stop at once."""


class Pools:
    """Who holds a place in which pool, in the order they came."""

    def __init__(self, limits: Mapping[Pool, int], counters: Counters[HostCounter]) -> None:
        unknown = set(limits) - set(POOLS)
        if unknown:
            raise ValueError(f"unknown connection pools {sorted(unknown)}")
        self.limits: Mapping[Pool, int] = MappingProxyType(
            {pool: limits.get(pool, rule.default) for pool, rule in POOLS.items()})
        self.counters = counters
        self._members: dict[Pool, dict[Member, None]] = {pool: {} for pool in POOLS}
        self._pool_of: dict[Member, Pool] = {}

    def __len__(self) -> int:
        return len(self._pool_of)

    def count(self, pool: Pool) -> int:
        return len(self._members[pool])

    def full(self, pool: Pool) -> bool:
        return len(self._members[pool]) >= self.limits[pool]

    def pool_of(self, member: Member) -> Pool | None:
        return self._pool_of.get(member)

    def join(self, member: Member, pool: Pool) -> bool:
        """Take ``member`` into ``pool`` (out of the one it was in); False, counted, if
        the pool is full and does not evict (it then stays where it was)."""
        members = self._members[pool]
        if self.full(pool):
            rule = POOLS[pool]
            self.counters.add(rule.full)
            if not rule.evicts:
                return False
            oldest = next(iter(members))
            self.leave(oldest)
            oldest.evict()
        self.leave(member)
        members[member] = None
        self._pool_of[member] = pool
        return True

    def leave(self, member: Member) -> None:
        pool = self._pool_of.pop(member, None)
        if pool is not None:
            del self._members[pool][member]
