"""Pages kept in a Redis Cluster: the key layout, writes a replica acknowledged,
reads, deletes, and each node's memory.

Everything here is synchronous (redis-py's cluster client); the store calls it in
worker threads (``hoststore.tierbackend``).  The store keeps each page's metadata
(which pages it holds, their versions, their age) in its own memory, as it does
for its slab; only page data lives in the cluster.

Key layout.  A client's pages are cut into *runs* of 256 pages (1 MiB), and each
run is one Redis hash, ``PREFIX:{STORE.CLIENT.RUN}``, whose fields are the pages'
offsets in the run.  Only the part in braces picks the hash slot (a Redis Cluster
hash tag), so a client's runs spread over all slots, and so over all masters,
while the pages of one run sit together: one FUSE write (at most 1 MiB, page
aligned) touches one or two runs, and is one command per run and one pipelined
round trip per node.  The store's instance id is in every key, so a store never
reads what another store (or an earlier run of itself) left behind.

Each value is the page's version (16 hex digits) followed by the page: a read
returns data only when the version is the one the store expects, so a late or
lost write can never be served as a page's current contents.  Writes go through
a script that stores a version only over an older one, and deletes through one
that deletes only versions not newer than the store's; the order in which
requests reach a node therefore cannot matter.

A write counts only once it reached a replica: each node's pipeline ends with
``WAIT 1 TIMEOUT``, which answers how many replicas acknowledged the connection's
writes so far (https://redis.io/docs/latest/commands/wait/).  Fewer than asked
for by the deadline, and the pages are refused (they go to the client's backing
file); a master that dies after that has them on the replica its failover
promotes.  A master whose replicas are not in sync (see ``replicas_in_sync``) gets
its pages refused without being sent, and the store hands back what it holds
there (``hoststore.tierbackend``).

A running store says so with a heartbeat: a key with a TTL on every master,
``PREFIX:{INSTANCE.alive.N}`` (N picked so that its slot is that master's),
rewritten several times within the TTL.  ``vswapctl tier-sweep`` deletes an
instance's keys only once no master holds one.  One key would live on one
master: its replica may not have the last rewrite, or (never synced) not have it
at all, and a failover to it would make a running store look dead until its
next beat; a copy on each master survives any one failover.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from redis.utils import str_if_bytes
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError

from vswapcommon.counters import Counters
from vswapcommon.logsetup import RateLimited
from pagewire.messages import PAGE_SIZE, PageStatus
from .pressure import Snapshot
from .slab import INDEX_SHIFT
from .tierconfig import TierConfig
from .tiercounters import TierCounter

log = logging.getLogger("hoststore")
# What the cluster client raises when a node or the cluster fails us.
FAILURES = (RedisError, RedisClusterException, OSError)
# A node that is down fails every batch: a few lines say so, not one per batch.
limited = RateLimited(log)

RUN_SHIFT = INDEX_SHIFT  # 256 pages per run: the store's index blocks, so its blocks name its runs
RUN_PAGES = 1 << RUN_SHIFT
SEQ_DIGITS = 16  # the version, in hex, before each page's data
VALUE_SIZE = SEQ_DIGITS + PAGE_SIZE
# A replica counts as in sync with its master while it has acknowledged within this
# many seconds (replicas acknowledge every second; a few missed under load are no loss) ...
REPLICA_MAX_LAG = 5
# ... and owes it at most this many bytes of the replication stream.
REPLICA_MAX_BEHIND = 64 << 20
# What decides whether a master's death stops the others (CONFIG GET on each master).
FULL_COVERAGE = "cluster-require-full-coverage"
READS_WHEN_DOWN = "cluster-allow-reads-when-down"

# Store a field's version over an older one, or the same one again (same version, same
# data: a write sent twice still writes, so the WAIT after it always waits for it),
# never over a newer one.  ARGV: field, value, ...
_PUT = """
for i = 1, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if (not old) or string.sub(old, 1, 16) <= string.sub(ARGV[i + 1], 1, 16) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
# Delete a field only if its version is not newer than the one given.  ARGV: field, version, ...
_DELETE = """
local n = 0
for i = 1, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old and string.sub(old, 1, 16) <= ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


class TierUnavailable(Exception):
    """A node could not be reached, or no longer serves the slot (try again after a refresh)."""


def encode_seq(seq: int) -> bytes:
    return b"%016x" % seq


def replicas_in_sync(info: dict[str, object]) -> int:
    """How many replicas hold what their master holds, from the master's INFO
    replication.  Not one whose first sync is not done (its state is not ``online``),
    whose link is down (the master no longer lists it), that has not acknowledged for
    ``REPLICA_MAX_LAG`` seconds, or that owes more than ``REPLICA_MAX_BEHIND`` bytes:
    a failover to it would lose pages, and a write would wait for it in vain."""
    offset = _int(info.get("master_repl_offset"))
    n = 0
    for name, replica in info.items():
        if not (name.startswith("slave") and name[5:].isdigit() and isinstance(replica, dict)):
            continue
        if (replica.get("state") == "online" and _int(replica.get("lag"), REPLICA_MAX_LAG + 1) <= REPLICA_MAX_LAG
                and offset - _int(replica.get("offset")) <= REPLICA_MAX_BEHIND):
            n += 1
    return n


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class FailoverScope(enum.IntEnum):
    """What a master's death stops until a replica takes over (worse is larger)."""

    SHARD = 0  # only its own slots: the other masters go on
    WRITES = 1  # every write to the cluster; reads of the other masters go on
    UNKNOWN = 2  # a master would not say
    CLUSTER = 3  # every request to the cluster


@dataclass
class Failover:
    """What the masters' settings make a master's death cost, as read at start."""

    scope: FailoverScope
    cost: str  # in words, for the log and stats
    settings: dict[str, dict[str, str]]  # master -> {setting: value} (what CONFIG GET answered)


@dataclass
class NodeMemory:
    name: str
    used: int
    maxmemory: int  # 0 where the node has no maxmemory (then its machine's RAM counts)
    limit: int
    replicas: int = 0  # replicas in sync (``replicas_in_sync``)

    @property
    def used_percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit else 0.0


@dataclass
class _NodeBatch:
    """One node's share of a request: its keys in order, with the batch indices of their pages."""

    node: ClusterNode
    keys: list[bytes] = field(default_factory=list)
    items: list[list[int]] = field(default_factory=list)


class RedisClusterTier:
    def __init__(self, config: TierConfig, instance: str) -> None:
        self.config = config
        self.instance = instance
        self.counters: Counters[TierCounter] = Counters(TierCounter)
        self.compressed = False  # values hold pages compressed (hoststore.tiercodec)
        self._counter_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tier")
        self.memory: list[NodeMemory] = []
        self._replicas: dict[str, int] = {}  # master -> replicas in sync, as its last INFO said
        # Masters that answered their last INFO with fewer replicas in sync than a write needs:
        # their pages are one failure from lost, and are handed back while they can be read.
        self.unreplicated: frozenset[str] = frozenset()
        self.failover: Failover | None = None  # what a master's death costs (read_failover)
        self.cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in config.nodes],
            socket_timeout=config.socket_timeout, socket_connect_timeout=min(config.socket_timeout, 0.5),
            require_full_coverage=False)
        self._primaries = self._slot_primaries()

    # -- layout ---------------------------------------------------------------------

    def key(self, client: int, run: int) -> bytes:
        return f"{self.config.prefix}:{{{self.instance}.{client}.{run}}}".encode()

    def node_of(self, key: bytes) -> ClusterNode:
        try:
            return self.cluster.get_node_from_key(key)
        except FAILURES as exc:
            raise TierUnavailable(f"no master serves key {key!r}: {exc}") from None

    def _group(self, client: int, pages: Sequence[int]) -> list[_NodeBatch]:
        """Pages by node, then by run (key), in the order given."""
        by_node: dict[str, _NodeBatch] = {}
        by_key: dict[int, list[int]] = {}
        for i, page in enumerate(pages):
            run = page >> RUN_SHIFT
            items = by_key.get(run)
            if items is None:
                key = self.key(client, run)
                node = self.node_of(key)
                batch = by_node.setdefault(node.name, _NodeBatch(node))
                items = by_key[run] = []
                batch.keys.append(key)
                batch.items.append(items)
            items.append(i)
        return list(by_node.values())

    def count(self, cause: TierCounter, n: int = 1) -> None:
        if n:
            with self._counter_lock:
                self.counters.add(cause, n)

    def _each_node(self, batches: list[_NodeBatch], work) -> list:  # type: ignore[no-untyped-def]
        """``work(batch)`` for every node's batch, in parallel when there are several."""
        if len(batches) == 1:
            return [_outcome(work, batches[0])]
        return list(self._pool.map(lambda b: _outcome(work, b), batches))

    # -- pages ----------------------------------------------------------------------

    def write(self, client: int, seq: int, pages: Sequence[int], data: Sequence[bytes | memoryview]
              ) -> list[PageStatus]:
        """Store ``data[i]`` as version ``seq`` of ``pages[i]``; a status per page, STORED
        only where a replica acknowledged it.  Never raises for the cluster's sake:
        whatever a node does, its pages are refused with the reason."""
        out = [PageStatus.REFUSED_TIER] * len(pages)
        try:
            batches = self._group(client, pages)
        except TierUnavailable as exc:
            limited("no master", logging.WARNING, "page tier: %s; refusing %d pages", exc, len(pages))
            self.count(TierCounter.REFUSED_UNREACHABLE, len(pages))
            self.refresh()
            return out
        prefix = encode_seq(seq)
        replicas, wait_ms = self.config.replicas, max(1, int(self.config.wait_timeout * 1000))

        def work(batch: _NodeBatch) -> list:  # type: ignore[type-arg]
            pipe = self.cluster.get_redis_connection(batch.node).pipeline(transaction=False)
            for key, items in zip(batch.keys, batch.items):
                args: list[bytes] = []
                for i in items:
                    args.append(b"%d" % (pages[i] & (RUN_PAGES - 1)))
                    args.append(prefix + data[i])  # one copy: into the command
                pipe.execute_command("EVAL", _PUT, 1, key, *args)
            pipe.execute_command("WAIT", replicas, wait_ms)
            return pipe.execute(raise_on_error=False)

        batches = self._refuse_unreplicated(batches, out)
        if self._settle_writes(batches, self._each_node(batches, work) if batches else [], out):
            self.refresh()
        return out

    def _refuse_unreplicated(self, batches: list[_NodeBatch], out: list[PageStatus]) -> list[_NodeBatch]:
        """A master without enough replicas in sync (its own died and it was promoted, its
        replica's first sync is not done, or it lags) would take each write and time out
        its WAIT: its pages are refused without the wait.  (As its last INFO said; a
        master not polled yet is tried, and WAIT decides.)  The batches still to write."""
        replicas = self.config.replicas
        for batch in [b for b in batches if self._replicas.get(b.node.name, replicas) < replicas]:
            batches.remove(batch)
            n = sum(len(items) for items in batch.items)
            limited("no replica", logging.WARNING, "page tier: master %s has fewer than %d replica(s) in sync; "
                    "refusing its pages", batch.node.name, replicas)
            self.count(TierCounter.REFUSED_NO_REPLICA, n)
            self.count(TierCounter.REFUSED_REPLICATION, n)
            for items in batch.items:
                for i in items:
                    out[i] = PageStatus.REFUSED_REPLICATION
        return batches

    def _settle_writes(self, batches: list[_NodeBatch], results: list[object], out: list[PageStatus]) -> bool:
        """Each page's status from its node's answers (scripts, then WAIT); True if a node
        failed in a way that asks for a fresh look at the cluster."""
        replicas = self.config.replicas
        refresh = False
        for batch, result in zip(batches, results):
            n = sum(len(items) for items in batch.items)
            if isinstance(result, BaseException):
                limited("write failed", logging.WARNING, "page tier: node %s failed a write (%s); refusing %d "
                        "pages", batch.node.name, _why(result), n)
                self.count(TierCounter.REFUSED_UNREACHABLE, n)
                refresh = True
                continue
            *scripts, acked = result
            replicated = isinstance(acked, int) and acked >= replicas
            if not replicated:
                limited("replication", logging.WARNING, "page tier: %s of %d replica(s) of %s acknowledged a write "
                        "within %gs; refusing its pages", acked, replicas, batch.node.name, self.config.wait_timeout)
            for items, answer in zip(batch.items, scripts):
                if isinstance(answer, BaseException):
                    oom = isinstance(answer, OutOfMemoryError)
                    status = PageStatus.REFUSED_NOMEM if oom else PageStatus.REFUSED_TIER
                    self.count(TierCounter.REFUSED_OOM if oom else TierCounter.REFUSED_UNREACHABLE, len(items))
                    refresh |= not oom
                elif not replicated:
                    status = PageStatus.REFUSED_REPLICATION
                    self.count(TierCounter.REFUSED_REPLICATION, len(items))
                else:
                    status = PageStatus.STORED
                    self.count(TierCounter.WRITTEN, len(items))
                for i in items:
                    out[i] = status
        return refresh

    def read(self, client: int, pages: Sequence[int], seqs: Sequence[int]) -> list[memoryview | None]:
        """Each page's data where the cluster holds exactly version ``seqs[i]``, else
        None: the caller takes None for a page lost, so it is given only on the word of
        a node that says, after the read, that it is a master in a cluster in state ok
        (``_confirm_master``).  Raises TierUnavailable if a node did not answer, or
        answered "missing" without that (an old master back empty, or on the minority
        side, which reads-when-down lets answer): nothing is lost by asking again once
        the cluster has settled."""
        batches = self._group(client, pages)

        def work(batch: _NodeBatch) -> list:  # type: ignore[type-arg]
            pipe = self.cluster.get_redis_connection(batch.node).pipeline(transaction=False)
            for key, items in zip(batch.keys, batch.items):
                pipe.execute_command("HMGET", key, *(b"%d" % (pages[i] & (RUN_PAGES - 1)) for i in items))
            return pipe.execute(raise_on_error=False)

        out: list[memoryview | None] = [None] * len(pages)
        for batch, result in zip(batches, self._each_node(batches, work)):
            failure = _failure(result)
            if failure is not None:
                self.refresh()
                raise TierUnavailable(f"node {batch.node.name}: {_why(failure)}")
            complete = True
            for items, values in zip(batch.items, result):
                for i, value in zip(items, values):
                    if value is not None and self._whole(value) and value[:SEQ_DIGITS] == encode_seq(seqs[i]):
                        out[i] = memoryview(value)[SEQ_DIGITS:]  # no copy; the caller copies once
                    else:
                        complete = False
            if not complete:
                self._confirm_master(batch.node)
        self.count(TierCounter.READ, sum(v is not None for v in out))
        return out

    def _whole(self, value: bytes) -> bool:
        """A value of the size a page's can be: exactly a page's, or compressed (an
        encoding's byte and at least a byte, at most a page)."""
        if self.compressed:
            return SEQ_DIGITS + 2 <= len(value) <= VALUE_SIZE + 1
        return len(value) == VALUE_SIZE

    def _confirm_master(self, node: ClusterNode) -> None:
        """``node`` said pages were missing: believe it only if it says now that it is
        a master and that its cluster is in state ok; else learn the slots again and
        raise TierUnavailable (the caller asks again)."""
        try:
            pipe = self.cluster.get_redis_connection(node).pipeline(transaction=False)
            pipe.execute_command("ROLE")
            pipe.execute_command("CLUSTER INFO")
            role, info = pipe.execute()
        except FAILURES as exc:
            role, info = None, f"no answer ({_why(exc)})"
        role_name = str_if_bytes(role[0]) if isinstance(role, (list, tuple)) and role else None
        state = _cluster_state(info)
        if role_name == "master" and state == "ok":
            return
        self.count(TierCounter.UNCONFIRMED_READS)
        self.refresh()
        raise TierUnavailable(f"node {node.name} answered that pages were missing, but it is not a master of a "
                              f"cluster in state ok (role {role_name}, cluster_state {state or info!r})")

    def delete(self, client: int, pages: Sequence[int], seqs: Sequence[int]) -> int:
        """Delete each page's stored version if it is not newer than ``seqs[i]``.
        Raises TierUnavailable if a node did not answer (the caller tries again later)."""
        batches = self._group(client, pages)

        def work(batch: _NodeBatch) -> list:  # type: ignore[type-arg]
            pipe = self.cluster.get_redis_connection(batch.node).pipeline(transaction=False)
            for key, items in zip(batch.keys, batch.items):
                args: list[bytes] = []
                for i in items:
                    args += [b"%d" % (pages[i] & (RUN_PAGES - 1)), encode_seq(seqs[i])]
                pipe.execute_command("EVAL", _DELETE, 1, key, *args)
            return pipe.execute(raise_on_error=False)

        deleted = 0
        failure: str | None = None
        for batch, result in zip(batches, self._each_node(batches, work)):
            bad = _failure(result)
            if bad is not None:
                failure = f"node {batch.node.name}: {_why(bad)}"
                continue
            deleted += sum(int(r) for r in result)
        self.count(TierCounter.DELETED, deleted)
        if failure is not None:
            self.refresh()
            raise TierUnavailable(failure)
        return deleted

    def drop_runs(self, client: int, runs: Sequence[int]) -> None:
        """Delete whole runs (a client that is gone for good).  Raises TierUnavailable."""
        first_pages = [run << RUN_SHIFT for run in runs]
        batches = self._group(client, first_pages)

        def work(batch: _NodeBatch) -> list:  # type: ignore[type-arg]
            pipe = self.cluster.get_redis_connection(batch.node).pipeline(transaction=False)
            for key in batch.keys:
                pipe.execute_command("UNLINK", key)
            return pipe.execute(raise_on_error=False)

        for batch, result in zip(batches, self._each_node(batches, work)):
            bad = _failure(result)
            if bad is not None:
                self.refresh()
                raise TierUnavailable(f"node {batch.node.name}: {_why(bad)}")

    # -- the cluster ----------------------------------------------------------------

    def _slot_primaries(self) -> dict[int, str]:
        """The master serving each slot range (by its first slot)."""
        out = {}
        for slot, nodes in self.cluster.nodes_manager.slots_cache.items():
            if nodes and (slot == 0 or self.cluster.nodes_manager.slots_cache.get(slot - 1) != nodes):
                out[slot] = nodes[0].name
        return out

    def refresh(self) -> None:
        """Learn the cluster's slots again (a node failed, or a failover moved them); at
        most every 0.2 s, whoever asks."""
        with self._refresh_lock:
            now = time.monotonic()
            if now - self._refreshed_at < 0.2:
                return
            self._refreshed_at = now
            try:
                self.cluster.nodes_manager.initialize()
            except FAILURES as exc:
                log.warning("page tier: cannot learn the cluster's slots now (%s)", _why(exc))
                return
            self.count(TierCounter.TOPOLOGY_REFRESHES)
            before, self._primaries = self._primaries, self._slot_primaries()
            moved = sum(1 for slot, name in self._primaries.items() if before.get(slot, name) != name)
            if moved:
                log.warning("page tier: %d slot range(s) now served by a new master (failover)", moved)
                self.count(TierCounter.FAILOVERS, moved)

    def poll_memory(self) -> list[NodeMemory]:
        """INFO memory (and replication: how many replicas in sync each has) of every
        master; a master that does not answer is left out."""
        out = []
        failed = False
        for node in self.cluster.get_primaries():
            try:
                info = self.cluster.get_redis_connection(node).info("memory", "replication")
            except FAILURES:
                failed = True
                continue
            replicas = self._replicas[node.name] = replicas_in_sync(info)
            maxmemory = int(info.get("maxmemory", 0))
            limit = maxmemory or int(info.get("total_system_memory", 0))
            out.append(NodeMemory(node.name, int(info["used_memory"]), maxmemory, limit, replicas))
        self.unreplicated = frozenset(m.name for m in out if m.replicas < self.config.replicas)
        if failed:
            self.refresh()
        if out:
            self.memory = out
        return out

    def runs_on(self, client: int, runs: Sequence[int], masters: Collection[str]) -> list[int]:
        """Those of a client's runs whose key one of ``masters`` serves."""
        out = []
        for run in runs:
            try:
                if self.node_of(self.key(client, run)).name in masters:
                    out.append(run)
            except TierUnavailable:
                continue
        return out

    def read_failover(self) -> Failover:
        """Ask every master what its death would stop (its cluster-require-full-coverage
        and cluster-allow-reads-when-down) and say it in words."""
        settings: dict[str, dict[str, str]] = {}
        refused: list[str] = []
        for node in self.cluster.get_primaries():
            conn = self.cluster.get_redis_connection(node)
            try:
                got = {name: conn.config_get(name).get(name) for name in (FULL_COVERAGE, READS_WHEN_DOWN)}
            except FAILURES as exc:
                refused.append(f"{node.name} ({_why(exc)})")
                continue
            settings[node.name] = {k: str(v) if v is not None else "unknown" for k, v in got.items()}
        self.failover = _failover(settings, refused, self.config.read_timeout)
        return self.failover

    def snapshot(self) -> Snapshot:
        """The cluster's memory as admission sees it: the fullest master decides (a
        client's pages spread evenly over the slots, so every master fills alike)."""
        memory = self.memory
        if not memory:
            return Snapshot(0, 0, 0.0)
        total = sum(m.limit for m in memory)
        used = sum(m.used for m in memory)
        return Snapshot(total, max(0, total - used), max(m.used_percent for m in memory))

    def stats(self) -> dict[str, object]:
        with self._counter_lock:
            counters = self.counters.as_dict()
        return {
            "address": str(self.config),
            "replicas": self.config.replicas,
            "wait_timeout": self.config.wait_timeout,
            "masters": {m.name: {"used_bytes": m.used, "maxmemory": m.maxmemory,
                                 "used_percent": round(m.used_percent, 1), "replicas_in_sync": m.replicas}
                        for m in self.memory},
            "unreplicated": sorted(self.unreplicated),
            "failover": None if self.failover is None else {"scope": self.failover.scope.name.lower(),
                                                             "cost": self.failover.cost},
            "heartbeat_ttl": self.config.heartbeat_ttl,
            **counters,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        try:
            self.cluster.close()
        except FAILURES:
            pass


def _outcome(work, batch: _NodeBatch):  # type: ignore[no-untyped-def]
    """A node's result, or the exception that stood for it."""
    try:
        return work(batch)
    except FAILURES as exc:
        return exc


def _failure(result: object) -> BaseException | None:
    """What went wrong with a node's pipeline: its own exception, or its first failed command's."""
    if isinstance(result, BaseException):
        return result
    return next((r for r in result if isinstance(r, BaseException)), None)  # type: ignore[attr-defined]


def _failover(settings: dict[str, dict[str, str]], refused: list[str], read_timeout: float) -> Failover:
    def scope(values: dict[str, str]) -> FailoverScope:
        if values.get(FULL_COVERAGE) == "no":
            return FailoverScope.SHARD
        if values.get(FULL_COVERAGE) != "yes" or values.get(READS_WHEN_DOWN) not in ("yes", "no"):
            return FailoverScope.UNKNOWN
        return FailoverScope.WRITES if values[READS_WHEN_DOWN] == "yes" else FailoverScope.CLUSTER

    by_scope: dict[FailoverScope, list[str]] = {}
    for name, values in sorted(settings.items()):
        by_scope.setdefault(scope(values), []).append(name)
    if refused:
        by_scope.setdefault(FailoverScope.UNKNOWN, []).extend(refused)
    worst = max(by_scope, default=FailoverScope.UNKNOWN)
    which = ", ".join(by_scope.get(worst, []))
    fix = (f"set {FULL_COVERAGE} no and {READS_WHEN_DOWN} yes on every node (tools/redis-cluster.sh does) so "
           "that a dead master costs only its own pages")
    cost = {
        FailoverScope.SHARD: "a master that dies costs only its own pages: reads of them wait for its replica to "
                             f"take over (up to {read_timeout:g}s), the other masters go on",
        FailoverScope.WRITES: f"a master that dies stops every write until its replica takes over ({which}: "
                              f"{FULL_COVERAGE} yes): pages go to the backing files meanwhile; reads go on "
                              f"({READS_WHEN_DOWN} yes); {fix}",
        FailoverScope.UNKNOWN: f"cannot tell what a master's death costs ({which} did not say {FULL_COVERAGE} / "
                               f"{READS_WHEN_DOWN}); {fix}",
        FailoverScope.CLUSTER: f"a master that dies stops the WHOLE cluster until its replica takes over ({which}: "
                               f"{FULL_COVERAGE} yes, {READS_WHEN_DOWN} no): every read waits, and fails after "
                               f"{read_timeout:g}s, and a master lost with no replica in sync stops the tier until "
                               f"it is back; {fix}",
    }[worst]
    return Failover(worst, cost, settings)


def _cluster_state(info: object) -> str | None:
    """``cluster_state`` from CLUSTER INFO's answer, parsed or not."""
    if isinstance(info, bytes):
        info = info.decode(errors="replace")
    if isinstance(info, str):
        info = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    if isinstance(info, dict):
        state = info.get("cluster_state")
        return str_if_bytes(state).strip() if state is not None else None
    return None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def connect(config: TierConfig, instance: str = "") -> RedisClusterTier:
    """A tier on a reachable cluster; TierUnavailable names why not.  ``instance``: the
    store whose keys it reads and writes (the tier backend sets its own)."""
    try:
        tier = RedisClusterTier(config, instance)
        tier.poll_memory()
    except FAILURES as exc:
        raise TierUnavailable(f"cannot reach the cluster at {config}: {_why(exc)}") from None
    if not tier.memory:
        raise TierUnavailable(f"no master of the cluster at {config} answered")
    return tier


