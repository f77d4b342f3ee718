"""A store instance's presence in a Redis Cluster page tier: its heartbeat, and the
sweep of the keys instances leave behind.

While a store runs, it keeps a heartbeat key on every master (rewritten
``HEARTBEATS_PER_TTL`` times within its TTL), so that ``vswapctl tier-sweep``
never deletes the keys of a store that is alive; at a clean exit it sweeps its
own keys, then deletes its heartbeat.  Heartbeat writes run on threads of their
own, one per master at most (a master whose last write still hangs is skipped),
so a hung master delays neither the others' heartbeats nor page reads and writes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from redis.cluster import ClusterNode

from .redistier import FAILURES, RedisClusterTier, TierUnavailable, _why, limited
from .tierconfig import HEARTBEATS_PER_TTL
from .tiercounters import TierCounter

log = logging.getLogger("hoststore")

HEARTBEAT_TAG = "alive"  # heartbeat keys PREFIX:{INSTANCE.alive.N}; page keys PREFIX:{INSTANCE.CLIENT.RUN}


@dataclass
class Instance:
    """What a store instance has in the cluster (``vswapctl tier-sweep``)."""

    keys: int = 0  # page keys
    heartbeat: dict[str, object] | None = None  # what its heartbeat says, while it has one: it is running


class Presence:
    def __init__(self, tier: RedisClusterTier) -> None:
        self.tier = tier
        self._beats: set[bytes] = set()  # heartbeat keys written
        self._beat_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tier-beat")
        self._beating: dict[str, Future[None]] = {}  # master -> its heartbeat write still under way

    def _heartbeat_key(self, n: int) -> bytes:
        return f"{self.tier.config.prefix}:{{{self.tier.instance}.{HEARTBEAT_TAG}.{n}}}".encode()

    def _pattern(self, instance: str, rest: str) -> bytes:
        """A SCAN pattern for keys of ``instance`` (or ``*``): ``rest`` follows its tag's first dot."""
        return f"{self.tier.config.prefix}:{{{instance}.{rest}".encode()

    def sweep(self) -> int:
        """Delete every page key of this store instance (at exit, after the drain:
        whatever a failed delete left behind; or, by ``vswapctl tier-sweep``, what a
        store that is gone left).  Not its heartbeat.  Returns keys deleted; raises
        TierUnavailable."""
        pattern = self._pattern(self.tier.instance, "[0-9]*")  # a client number follows the dot
        deleted = 0
        for node in self.tier.cluster.get_primaries():
            conn = self.tier.cluster.get_redis_connection(node)
            try:
                for key in conn.scan_iter(match=pattern, count=1000):
                    deleted += conn.unlink(key)
            except FAILURES as exc:
                raise TierUnavailable(f"node {node.name}: {_why(exc)}") from None
        return deleted

    def instances(self, instance: str = "*") -> dict[str, Instance]:
        """The store instances with keys under this tier's prefix (or only ``instance``):
        their page keys, and their heartbeat while they run.  Every master is asked;
        one that does not answer raises TierUnavailable (it may hold the only heartbeat
        left of a running store)."""
        found: dict[str, Instance] = {}
        for node in self.tier.cluster.get_primaries():
            conn = self.tier.cluster.get_redis_connection(node)
            try:
                for key in conn.scan_iter(match=self._pattern(instance, "*"), count=1000):
                    name, _, rest = key.decode(errors="replace").partition("{")[2].partition(".")
                    entry = found.setdefault(name, Instance())
                    if not rest.startswith(HEARTBEAT_TAG + "."):
                        entry.keys += 1
                    elif entry.heartbeat is None:
                        entry.heartbeat = _heartbeat_value(conn.get(key))
            except FAILURES as exc:
                raise TierUnavailable(f"node {node.name}: {_why(exc)}") from None
        return {name: entry for name, entry in found.items() if entry.keys or entry.heartbeat is not None}

    def _heartbeat_keys(self) -> list[tuple[ClusterNode, bytes]]:
        """One heartbeat key per master: ``PREFIX:{INSTANCE.alive.N}`` with the first N
        whose slot it serves (a master of a handful of slots may get none)."""
        masters = {node.name for node in self.tier.cluster.get_primaries()}
        keys: dict[str, tuple[ClusterNode, bytes]] = {}
        for n in range(64 * len(masters)):
            key = self._heartbeat_key(n)
            try:
                node = self.tier.node_of(key)
            except TierUnavailable:
                continue
            if node.name in masters:
                keys.setdefault(node.name, (node, key))
                if len(keys) == len(masters):
                    break
        return list(keys.values())

    def beat(self) -> int:
        """Write this store instance's heartbeat on every master, with the TTL, on all
        of them at once, and wait at most one heartbeat interval (a fifth of the TTL):
        a master that hangs (up to the socket timeout, which may be longer than the
        TTL) costs only its own heartbeat, never the others'.  A master whose last
        write has not finished is not written again (at most one thread each).
        Returns the masters that took it; raises TierUnavailable if none did."""
        value = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "ttl": self.tier.config.heartbeat_ttl}).encode()
        ttl_ms = max(1, int(self.tier.config.heartbeat_ttl * 1000))
        failures: list[str] = []
        started: dict[str, tuple[bytes, Future[None]]] = {}
        for node, key in self._heartbeat_keys():
            if node.name in self._beating:
                failures.append(f"{node.name}: its last heartbeat write has not finished")
                continue
            try:
                connection = self.tier.cluster.get_redis_connection(node)
            except FAILURES as exc:
                failures.append(f"{node.name}: {_why(exc)}")
                continue
            future = self._beat_pool.submit(connection.set, key, value, px=ttl_ms)
            self._beating[node.name] = future
            future.add_done_callback(lambda _, name=node.name: self._beating.pop(name, None))
            started[node.name] = (key, future)
        wait_futures([f for _, f in started.values()], timeout=self.heartbeat_interval())
        written = 0
        for name, (key, future) in started.items():
            if not future.done():
                failures.append(f"{name}: no answer within {self.heartbeat_interval():g}s")
            elif (exc := future.exception()) is not None:
                failures.append(f"{name}: {_why(exc)}")
            else:
                self._beats.add(key)
                written += 1
        self.tier.count(TierCounter.HEARTBEAT_FAILURES, len(failures))
        if failures:  # learnt meanwhile: asking the nodes may wait on the hung one, beat() may not
            self._beat_pool.submit(self.tier.refresh)
        if not written:
            raise TierUnavailable("no master took the heartbeat (" + "; ".join(failures) + ")")
        if failures:
            limited("heartbeat", logging.WARNING, "page tier: the heartbeat did not reach %s", "; ".join(failures))
        return written

    def heartbeat_interval(self) -> float:
        return self.tier.config.heartbeat_ttl / HEARTBEATS_PER_TTL

    def end_heartbeat(self) -> None:
        """Delete the heartbeat (a clean exit, after the sweep).  Raises TierUnavailable;
        what is not deleted expires with its TTL."""
        failures = []
        for key in sorted(self._beats):
            try:
                self.tier.cluster.get_redis_connection(self.tier.node_of(key)).unlink(key)
            except (*FAILURES, TierUnavailable) as exc:
                failures.append(f"{key.decode()}: {_why(exc)}")
                continue
            self._beats.discard(key)
        if failures:
            raise TierUnavailable("deleting the heartbeat failed: " + "; ".join(failures))

    def close(self) -> None:
        self._beat_pool.shutdown(wait=False)


def _heartbeat_value(raw: bytes | None) -> dict[str, object] | None:
    """A heartbeat's value (None: it expired meanwhile); one that is not ours to read
    still says that its store runs."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}
