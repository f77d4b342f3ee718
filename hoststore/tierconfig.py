"""How users name a page tier: ``redis-cluster://HOST:PORT[,HOST:PORT...]`` and the
settings that go with it.  Apart from ``hoststore.redistier`` so that checking an
argument does not load the Redis client (every ``vswapctl`` command builds its parser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagewire.address import parse_address

SCHEME = "redis-cluster://"


class TierConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TierConfig:
    nodes: tuple[tuple[str, int], ...]
    replicas: int = 1  # replicas that must acknowledge a write
    wait_timeout: float = 0.5  # seconds: how long a write waits for them
    read_timeout: float = 20.0  # seconds: how long a read keeps trying (a failover takes a few)
    prefix: str = "vswap"
    socket_timeout: float = 5.0
    # seconds a store's heartbeat outlives it: until then `vswapctl tier-sweep` takes it for running
    heartbeat_ttl: float = 30.0

    def __str__(self) -> str:
        return SCHEME + ",".join(f"{h}:{p}" for h, p in self.nodes)


def parse_tier(text: str) -> TierConfig:
    """``redis-cluster://HOST:PORT[,HOST:PORT...]``; TierConfigError names the problem."""
    if not text.startswith(SCHEME):
        raise TierConfigError(f"tier {text!r} is not {SCHEME}HOST:PORT[,HOST:PORT...]")
    nodes = []
    for part in text[len(SCHEME):].split(","):
        if not part:
            raise TierConfigError(f"tier {text!r} has an empty node: each is HOST:PORT")
        try:
            address = parse_address(f"tcp:{part}")
        except ValueError as exc:
            raise TierConfigError(f"tier node {part!r} is not HOST:PORT ({str(exc).replace('tcp:', '')})") from None
        if not address.port:
            raise TierConfigError(f"tier node {part!r}: port 0 out of range")
        nodes.append((address.host, address.port))
    return TierConfig(tuple(nodes))


MIN_HEARTBEAT_TTL = 1.0  # seconds
HEARTBEATS_PER_TTL = 5  # a store refreshes its heartbeat this many times within its TTL


def parse_prefix(text: str) -> str:
    """A key prefix: it is matched as a glob when keys are listed and swept, and the
    part of a key in braces picks its slot, so neither may appear in it."""
    if not text or any(c in text for c in "{}*?[]\\ "):
        raise TierConfigError(f"prefix {text!r} must be a non-empty name without braces, spaces, backslashes or "
                              "globs")
    return text


def parse_heartbeat_ttl(text: str) -> float:
    try:
        ttl = float(text)
    except ValueError:
        raise TierConfigError(f"heartbeat TTL {text!r} is not a number of seconds") from None
    if not math.isfinite(ttl) or ttl < MIN_HEARTBEAT_TTL:
        raise TierConfigError(f"heartbeat TTL {text} is not a number of seconds of at least {MIN_HEARTBEAT_TTL:g}")
    return ttl
