"""The page tier on Redis Cluster: a store whose page data lives in a real local
3+3 cluster.  Put, get, invalidate and hand-back; refusals when a replica does not
acknowledge, a node does not answer or is full; admission from the masters'
memory; reads through a master's death."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from typing import Any

import pytest
import redis
import trio
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

from pagewire.access import IN_PROCESS
from pagewire.address import Address
from hoststore.clientpages import NIL
from pagewire.messages import PAGE_SIZE, HandBackCause, PageStatus, TakeStatus
from hoststore.policy import Limits
from hoststore.redistier import (
    FULL_COVERAGE,
    READS_WHEN_DOWN,
    REPLICA_MAX_BEHIND,
    REPLICA_MAX_LAG,
    RUN_PAGES,
    SEQ_DIGITS,
    FailoverScope,
    TierCounter,
    connect,
    replicas_in_sync,
)
from hoststore.tierconfig import TierConfigError, parse_heartbeat_ttl, parse_prefix, parse_tier
from hoststore.store import HostCounter, RequestError, Store, get_answer
from hoststore.tierbackend import tiered_store
from vswapctl import rediscluster
from vswapfs.hostclient import HostClient

from .rediscluster import LocalCluster
from .test_rpc import start_client, start_server
from .test_store import hello, page

S = PageStatus


def data(first: int, n: int, version: int) -> bytes:
    return b"".join(page(first + i, version) for i in range(n))


def make(cluster: LocalCluster, capacity: int = 1 << 20, **tier: object) -> Store:
    """A store on ``cluster``.  A replica gets 3 s to acknowledge a write, not the daemon's
    0.5 s: on a loaded CI machine a healthy replica can take longer (a test of a slow or
    missing replica sets its own)."""
    tier.setdefault("wait_timeout", 3.0)
    config = dataclasses.replace(parse_tier(cluster.address), **tier)  # type: ignore[arg-type]
    return tiered_store(Limits(capacity_pages=capacity), connect(config))


def attach(store: Store, name: str = "a", npages: int = 1 << 16, instance: str = "i1"):  # type: ignore[no-untyped-def]
    client, _, _ = store.attach(hello(name, npages, instance), b"s" * 16, owner=IN_PROCESS)
    store.bind(client, object())
    return client


async def read_back(store: Store, client, first: int, n: int):  # type: ignore[no-untyped-def]
    status, seqs, got = b"", array("Q"), b""
    for at in range(first, first + n, 256):  # a get asks for 256 pages at most
        answer = await get_answer(store, client, array("Q", range(at, min(at + 256, first + n))))
        status, seqs, got = status + answer.statuses, seqs + answer.seqs, got + bytes(answer.data)
    return status, seqs, got


def fields(cluster: LocalCluster, store: Store, client, pages: range) -> int:  # type: ignore[no-untyped-def]
    """How many of these pages have a field in the cluster (any version), asked by a
    client of the test's own."""
    host, port = parse_tier(cluster.address).nodes[0]
    probe = RedisCluster(host=host, port=port)
    try:
        return sum(probe.hexists(store.backend.tier.key(client.tier_id, p // RUN_PAGES), str(p % RUN_PAGES)) for p in pages)
    finally:
        probe.close()


# -- no cluster needed ------------------------------------------------------------------


def test_parse_tier() -> None:
    config = parse_tier("redis-cluster://127.0.0.1:7000,[::1]:7001,node-b:7002")
    assert config.nodes == (("127.0.0.1", 7000), ("::1", 7001), ("node-b", 7002))
    assert str(parse_tier("redis-cluster://h:1")) == "redis-cluster://h:1"
    for bad, why in [("redis://h:1", "is not redis-cluster://"), ("redis-cluster://h", "is not HOST:PORT"),
                     ("redis-cluster://h:x", "not a number"), ("redis-cluster://h:0", "out of range"),
                     ("redis-cluster://h:1,", "has an empty node"), ("redis-cluster://h:70000", "out of range")]:
        with pytest.raises(TierConfigError, match=why):
            parse_tier(bad)


def test_prefix_and_heartbeat_ttl_are_checked() -> None:
    assert parse_prefix("vswap-b") == "vswap-b" and parse_heartbeat_ttl("2.5") == 2.5
    for bad in ["", "a*", "a{b", "a b", "a\\b"]:
        with pytest.raises(TierConfigError, match="must be a non-empty name"):
            parse_prefix(bad)
    for bad in ["0.5", "nan", "inf", "x"]:
        with pytest.raises(TierConfigError, match="heartbeat TTL"):
            parse_heartbeat_ttl(bad)


def _replica(state: str = "online", lag: int = 0, behind: int = 0) -> dict[str, object]:
    return {"ip": "127.0.0.1", "port": 7001, "state": state, "offset": 10**9 - behind, "lag": lag}


@pytest.mark.parametrize("replicas, in_sync", [
    ({"slave0": _replica()}, 1),
    ({}, 0),  # its link is down: the master no longer lists it
    ({"slave0": _replica("wait_bgsave")}, 0),  # its first sync is not done
    ({"slave0": _replica("send_bulk")}, 0),
    ({"slave0": _replica(lag=REPLICA_MAX_LAG)}, 1),
    ({"slave0": _replica(lag=REPLICA_MAX_LAG + 1)}, 0),  # no acknowledgement for too long
    ({"slave0": _replica(behind=REPLICA_MAX_BEHIND + 1)}, 0),  # too far behind
    ({"slave0": _replica("wait_bgsave"), "slave1": _replica()}, 1),
])
def test_a_replica_is_in_sync_only_when_online_recent_and_close(replicas: dict[str, object], in_sync: int) -> None:
    info = {"role": "master", "connected_slaves": len(replicas), "master_repl_offset": 10**9, **replicas}
    assert replicas_in_sync(info) == in_sync


def test_hoststore_refuses_an_unreachable_cluster_before_listening(tmp_path) -> None:
    sock = tmp_path / "s.sock"
    done = subprocess.run([sys.executable, "-m", "hoststore", "--listen", f"unix:{sock}",
                           "--tier", "redis-cluster://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--tier: cannot reach the cluster" in done.stderr
    assert not sock.exists()
    done = subprocess.run([sys.executable, "-m", "hoststore", "--listen", f"unix:{sock}", "--tier",
                           "redis-cluster://127.0.0.1:1", "--pressure-source", "psutil"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "does not go with --tier" in done.stderr


def _answering(base: int) -> list[int]:
    """Which of the cluster's six ports still accept connections (redis-server renames
    its process, so it is found by its ports)."""
    alive = []
    for port in range(base, base + 6):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                alive.append(port)
    return alive


@pytest.mark.parametrize("trouble", ["the sixth node cannot start", "a busy cluster bus port"])
def test_the_cluster_script_stops_what_it_started_when_up_fails(tmp_path, trouble: str) -> None:
    reason = rediscluster.redis_missing()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "rc"
    base = rediscluster.free_base_port()
    with socket.socket() as busy:
        if trouble == "a busy cluster bus port":
            busy.bind(("127.0.0.1", base + 10003))
            busy.listen()
        else:  # five nodes start; the sixth's directory cannot be made
            directory.mkdir()
            (directory / str(base + 5)).write_text("in the way\n")
        done = subprocess.run([rediscluster.SCRIPT, "up", str(directory), "--port", str(base)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert _answering(base) == []
    if trouble == "a busy cluster bus port":
        assert "in use" in done.stderr and not directory.exists()  # refused before anything started
    else:
        assert "start failed; stopping what was started" in done.stderr
        assert sorted(p.name for p in directory.iterdir()) == [str(base + 5)]  # only what was ours before


@pytest.mark.parametrize("other, why", [
    (["--host", "unix:/run/x.sock"], "--tier is for the hoststore up starts"),
    (["--pressure-source", "file:/tmp/p"], "--pressure-source does not go with --tier"),
])
def test_up_refuses_a_tier_with_what_it_cannot_go_with(tmp_path, capsys: pytest.CaptureFixture[str],
                                                        other: list[str], why: str) -> None:
    from vswapctl import cli

    argv = ["--state-dir", str(tmp_path / "state"), "up", "--size", "64M", "--tier", "redis-cluster://h:1", *other]
    assert cli.main(argv) == 1
    assert why in capsys.readouterr().err and not (tmp_path / "state").exists()


# -- a shared cluster ---------------------------------------------------------------------


async def test_put_get_invalidate_against_the_cluster(redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    try:
        client = attach(store)
        first, n = 200, 112  # two runs
        statuses = await store.put(client, first, 5, data(first, n, 1))
        assert statuses == bytes(n) and store.pages == n == client.count
        status, seqs, got = await read_back(store, client, first, n)
        assert status == bytes(n) and set(seqs) == {5} and got == data(first, n, 1)
        assert fields(cluster, store, client, range(first, first + n)) == n
        # A client's runs spread over every master; the pages of one run stay on one.
        nodes = {store.backend.tier.node_of(store.backend.tier.key(client.tier_id, run)).name for run in range(16)}
        assert len(nodes) == 3
        assert store.counters[HostCounter.ACCEPTED] == n and store.backend.tier.counters[TierCounter.WRITTEN] == n
        # A newer version replaces; an older one is refused as outdated.
        assert await store.put(client, first, 7, data(first, 10, 2)) == bytes(10)
        assert await store.put(client, first, 6, data(first, 10, 3)) == bytes([S.REFUSED_OUTDATED]) * 10
        status, seqs, got = await read_back(store, client, first, 10)
        assert set(seqs) == {7} and got == data(first, 10, 2)
        # Invalidate drops what is not newer than its version, here and (soon) in the cluster.
        assert await store.invalidate(client, first, 80, 6) == 70
        await store.backend.flush_deletes()
        status, _, _ = await read_back(store, client, first, 80)
        assert status == bytes(10) + bytes([S.MISSING]) * 70
        assert fields(cluster, store, client, range(first, first + 80)) == 10
        assert store.pages == n - 70
    finally:
        await store.aclose()
    assert cluster.keys(f"vswap:{{{store.instance}.*") == 0  # the exit swept what was left


async def test_a_late_delete_never_removes_a_newer_write(redis_cluster_session: LocalCluster) -> None:
    store = make(redis_cluster_session)
    try:
        tier = store.backend.tier
        assert tier.write(9, 10, [1], [page(1, 10)]) == [S.STORED]
        assert tier.write(9, 8, [1], [page(1, 8)]) == [S.STORED]  # an older write, arriving late: ignored
        assert tier.read(9, [1], [10]) == [page(1, 10)] and tier.read(9, [1], [8]) == [None]
        assert tier.delete(9, [1], [9]) == 0  # a delete of an older version, arriving late
        assert tier.read(9, [1], [10]) == [page(1, 10)]
        assert tier.delete(9, [1], [10]) == 1 and tier.read(9, [1], [10]) == [None]
    finally:
        await store.aclose()


async def test_pages_no_replica_acknowledged_are_refused_and_the_old_copy_goes(
        redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)  # the first version needs its replica's word: the usual 3 s for it
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, data(0, 8, 1)) == bytes(8)
        # Each master has one replica: two never answer, and 0.1 s is enough to find that out.
        store.backend.tier.config = dataclasses.replace(store.backend.tier.config, replicas=2, wait_timeout=0.1)
        statuses = await store.put(client, 0, 2, data(0, 8, 2))
        assert statuses == bytes([S.REFUSED_REPLICATION]) * 8
        assert store.pages == 0 and client.count == 0  # neither the new version nor the old one is kept
        assert store.counters[HostCounter.REFUSED_REPLICATION] == 8
        assert store.counters[HostCounter.STALE_DROPPED] == 8
        assert store.backend.tier.counters[TierCounter.REFUSED_REPLICATION] == 8
        status, _, _ = await read_back(store, client, 0, 8)
        assert status == bytes([S.MISSING]) * 8
        await store.backend.flush_deletes()
        assert fields(cluster, store, client, range(8)) == 0  # what reached the master alone was deleted
    finally:
        await store.aclose()


async def test_a_node_that_does_not_answer_in_time_gets_its_pages_refused(
        redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster, socket_timeout=0.3)
    try:
        client = attach(store)
        for port in cluster.masters():
            cluster.cli(port, "client", "pause", "1500", "write")
        statuses = await store.put(client, 0, 1, data(0, 4, 1))
        assert statuses == bytes([S.REFUSED_TIER]) * 4 and store.pages == 0
        assert store.backend.tier.counters[TierCounter.REFUSED_UNREACHABLE] == 4
        # Not an ordering but the pause this test set: once its 1.5 s are over, the write
        # that waited at the master lands, or was dropped with its timed-out connection...
        await trio.sleep(1.6)
        await store.backend.flush_deletes()
        assert fields(cluster, store, client, range(4)) == 0  # ...and is deleted by version
        assert await store.put(client, 0, 2, data(0, 4, 2)) == bytes(4)
    finally:
        await store.aclose()


async def test_a_full_node_answers_oom_which_is_a_refusal(redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)  # the memory watch is not running: the write reaches the node
    try:
        client = attach(store)
        cluster.set_maxmemory("1")
        statuses = await store.put(client, 0, 1, data(0, 4, 1))
        assert statuses == bytes([S.REFUSED_NOMEM]) * 4 and store.pages == 0
        assert store.backend.tier.counters[TierCounter.REFUSED_OOM] == 4
    finally:
        cluster.set_maxmemory("256mb")
        await store.aclose()


async def test_admission_follows_the_masters_memory_with_hysteresis(redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    try:
        client = attach(store)
        used = max(m.used for m in store.backend.tier.poll_memory())
        cluster.set_maxmemory(str(int(used / 0.95)))  # about 95 % used: above the high watermark (90)
        store.backend.tier.poll_memory()
        assert store.backend.tier.snapshot().used_percent > 90
        statuses = await store.put(client, 0, 1, data(0, 4, 1))
        assert statuses == bytes([S.REFUSED_PRESSURE]) * 4
        assert store.counters[HostCounter.REFUSED_PRESSURE] == 4 and store.pressure
        cluster.set_maxmemory(str(int(used / 0.85)))  # 85 %: between the watermarks, still refusing
        store.backend.tier.poll_memory()
        assert await store.put(client, 0, 2, data(0, 4, 1)) == bytes([S.REFUSED_PRESSURE]) * 4
        cluster.set_maxmemory("256mb")  # far below the low watermark: accepting again
        store.backend.tier.poll_memory()
        assert await store.put(client, 0, 3, data(0, 4, 1)) == bytes(4)
        assert not store.pressure
        assert store.stats(admin=True)["tier"]["masters"]  # type: ignore[index]
    finally:
        cluster.set_maxmemory("256mb")
        await store.aclose()


async def test_hand_back_reads_from_the_cluster_and_frees_there(redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, data(0, 64, 1)) == bytes(64)
        handback = await store.lend(client, HandBackCause.PRESSURE, 16)
        assert handback is not None and len(handback.pages) == 16
        for i, p in enumerate(handback.pages):
            assert handback.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == page(p, 1)
        answer = bytes([TakeStatus.TAKEN]) * 15 + bytes([TakeStatus.FAILED])
        assert store.settle(client, handback, answer) == 15
        await store.backend.flush_deletes()
        assert store.pages == 49 and fields(cluster, store, client, range(64)) == 49
        assert store.counters[HostCounter.HANDED_BACK_PRESSURE] == 15
    finally:
        await store.aclose()


async def test_a_client_replaced_by_a_new_instance_leaves_nothing_in_the_cluster(
        redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    try:
        old = attach(store, instance="old")
        for first in (1000, 5000, 9000):
            assert await store.put(old, first, 1, data(first, 200, 1)) == bytes(200)
        store.detach(old, old.session)
        store.registry.clock = lambda: 1e12  # long after --away-timeout
        new = attach(store, instance="new")
        assert new.tier_id != old.tier_id and store.pages == 0
        await store.backend.flush_deletes()
        assert cluster.keys(f"vswap:{{{store.instance}.{old.tier_id}.*") == 0
    finally:
        await store.aclose()


def _sweep(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from vswapctl import cli

    try:
        code = cli.main(["tier-sweep", *args])
    except SystemExit as exc:  # argparse refused the arguments
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def test_tier_sweep_refuses_a_running_store_and_sweeps_it_once_killed(
        redis_cluster_session: LocalCluster, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real hoststore process on the cluster: its keys cannot be swept while it runs,
    not even when one master lost its heartbeat (as in a failover to a replica that
    missed it); once it is SIGKILLed and its heartbeat's TTL is over, they can."""
    cluster = redis_cluster_session
    sock = tmp_path / "s.sock"
    with open(tmp_path / "hoststore.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "hoststore", "--listen", f"unix:{sock}", "--tier",
                                 cluster.address, "--tier-heartbeat-ttl", "3"], stdout=log_file, stderr=log_file)
    try:
        async with trio.open_nursery() as nursery:
            client = HostClient(Address("unix", path=str(sock)), "c", 1024 * PAGE_SIZE, backoff_min=0.05,
                                backoff_max=0.2)
            nursery.start_soon(client.run)
            with trio.fail_after(30):
                await client.wait_connected()
            for first in (0, 512):  # two runs: two keys
                assert await client.put(first, 1, data(first, 8, 1)) == bytes(8)
            instance = client.store_instance
            assert instance is not None
            nursery.cancel_scope.cancel()
        heartbeats = f"vswap:{{{instance}.alive.*"
        assert set(cluster.keys_by_master(heartbeats).values()) == {1}  # a heartbeat on every master

        code, out, _ = await trio.to_thread.run_sync(_sweep, capsys, cluster.address)
        assert code == 0 and f"{instance}  2 keys  running (" in out and f"pid {proc.pid}" in out
        code, _, err = await trio.to_thread.run_sync(_sweep, capsys, cluster.address, instance)
        assert code == 1 and f"store instance {instance} is running" in err
        assert cluster.keys(f"vswap:{{{instance}.[0-9]*") == 2
        # One master loses its copy (the store frozen, so that it does not write it again
        # before the sweep): the others still say the store runs.
        proc.send_signal(signal.SIGSTOP)
        lost_on = next(port for port, n in cluster.keys_by_master(heartbeats).items() if n)
        cluster.cli(lost_on, "eval", f"return redis.call('del', unpack(redis.call('keys', '{heartbeats}')))", "0")
        assert cluster.keys_by_master(heartbeats)[lost_on] == 0
        code, _, err = await trio.to_thread.run_sync(_sweep, capsys, cluster.address, instance)
        assert code == 1 and "is running" in err and cluster.keys(f"vswap:{{{instance}.[0-9]*") == 2

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with trio.fail_after(10):  # the TTL (3 s) runs out
            while cluster.keys(heartbeats):
                await trio.sleep(0.1)
        code, out, _ = await trio.to_thread.run_sync(_sweep, capsys, cluster.address)
        assert code == 0 and f"{instance}  2 keys  gone (no heartbeat)" in out
        code, _, err = await trio.to_thread.run_sync(_sweep, capsys, cluster.address, "*")
        assert code == 2 and "is not a store instance" in err  # only an instance id, never a pattern
        code, out, _ = await trio.to_thread.run_sync(_sweep, capsys, cluster.address, instance)
        assert code == 0 and f"deleted 2 keys of store instance {instance}" in out
        assert cluster.keys(f"vswap:{{{instance}.*") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_a_store_deletes_its_heartbeat_at_a_clean_exit_after_its_sweep(
        redis_cluster_session: LocalCluster) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    client = attach(store)
    assert await store.put(client, 0, 1, data(0, 8, 1)) == bytes(8)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        found = store.backend.presence.instances()[store.instance]
        assert found.keys == 1 and found.heartbeat is not None and found.heartbeat["pid"] == os.getpid()
        nursery.cancel_scope.cancel()
    await store.aclose()
    assert cluster.keys(f"vswap:{{{store.instance}.*") == 0  # neither pages nor heartbeat


async def test_the_store_says_what_a_masters_death_costs(redis_cluster_session: LocalCluster,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The local cluster's nodes keep the other masters going; a master with Redis's
    defaults would stop them all, and the store says so at start."""
    cluster = redis_cluster_session
    stores = [make(cluster)]
    port = cluster.masters()[0]
    try:
        failover = stores[0].backend.tier.failover
        assert failover is not None and failover.scope == FailoverScope.SHARD
        assert len(failover.settings) == 3
        assert all(v == {FULL_COVERAGE: "no", READS_WHEN_DOWN: "yes"} for v in failover.settings.values())
        assert stores[0].stats()["tier"]["failover"]["scope"] == "shard"  # type: ignore[index]
        cluster.cli(port, "config", "set", FULL_COVERAGE, "yes")
        cluster.cli(port, "config", "set", READS_WHEN_DOWN, "no")
        with caplog.at_level(logging.WARNING, logger="hoststore"):
            stores.append(make(cluster))
        assert stores[1].stats()["tier"]["failover"]["scope"] == "cluster"  # type: ignore[index]
        assert "page tier: a master that dies stops the WHOLE cluster" in caplog.text
        assert f"127.0.0.1:{port}: {FULL_COVERAGE} yes" in caplog.text
        cluster.cli(port, "config", "set", READS_WHEN_DOWN, "yes")
        assert stores[1].backend.tier.read_failover().scope == FailoverScope.WRITES
        # Where CONFIG is not allowed (a managed cluster may rename it), the store says it cannot tell.
        def no_config(*args: object, **kwargs: object) -> None:
            raise ResponseError("unknown command 'CONFIG'")

        with monkeypatch.context() as patch:
            patch.setattr(redis.Redis, "config_get", no_config)
            failover = stores[1].backend.tier.read_failover()
        assert failover.scope == FailoverScope.UNKNOWN and "cannot tell" in failover.cost
        assert all(f"127.0.0.1:{p} (ResponseError: unknown command 'CONFIG')" in failover.cost
                   for p in cluster.masters())
    finally:
        cluster.cli(port, "config", "set", FULL_COVERAGE, "no")
        cluster.cli(port, "config", "set", READS_WHEN_DOWN, "yes")
        for store in stores:
            await store.aclose()


async def test_a_page_on_its_way_to_the_cluster_is_neither_lost_nor_handed_back(
        redis_cluster_session: LocalCluster) -> None:
    """A hand-back that picks a page whose write is still in flight (its node paused)
    finds nothing there yet: the page stays, its put answers stored, and it reads back."""
    cluster = redis_cluster_session
    store = make(cluster)
    try:
        client = attach(store)
        for port in cluster.masters():
            cluster.cli(port, "client", "pause", "700", "write")
        async with trio.open_nursery() as nursery:
            answers: list[bytes] = []

            async def put() -> None:
                answers.append(await store.put(client, 0, 1, data(0, 4, 1)))

            nursery.start_soon(put)
            with trio.fail_after(5):  # recorded, the write on its way (waiting at the paused node)
                while not store.backend._being_written(client, 3, 1):
                    await trio.sleep(0.01)
            assert client.count == 4
            assert await store.lend(client, HandBackCause.DRAIN, 256) is None
            assert client.lent_count == 0 and client.count == 4
        assert answers == [bytes(4)]
        assert store.backend.tier.counters[TierCounter.LOST] == 0
        status, _, got = await read_back(store, client, 0, 4)
        assert status == bytes(4) and got == data(0, 4, 1)
    finally:
        await store.aclose()


async def test_a_write_that_lands_while_a_hand_back_reads_is_not_taken_for_lost(
        redis_cluster_session: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race a pause cannot order: the hand-back's read misses the page, the write
    then lands and its put answers stored, and only then does the read come back."""
    store = make(redis_cluster_session)
    tier = store.backend.tier
    real_write, gate, arrived, answered = tier.write, threading.Event(), threading.Event(), threading.Event()

    def gated_write(*args):  # type: ignore[no-untyped-def]
        arrived.set()
        gate.wait(5)
        return real_write(*args)

    def early_read(client_id, pages, seqs):  # type: ignore[no-untyped-def]
        gate.set()  # the write goes on now...
        assert answered.wait(5)  # ...and is answered before this read, which missed it
        return [None] * len(pages)

    monkeypatch.setattr(tier, "write", gated_write)
    monkeypatch.setattr(tier, "read", early_read)
    try:
        client = attach(store)
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def put() -> None:
                answers.append(await store.put(client, 0, 1, data(0, 4, 1)))
                answered.set()

            nursery.start_soon(put)
            assert await trio.to_thread.run_sync(arrived.wait, 5)  # recorded, its write at the gate
            handback = await store.lend(client, HandBackCause.PRESSURE, 256)
            gate.set()
        assert handback is None and answers == [bytes(4)]
        assert tier.counters[TierCounter.LOST] == 0 and client.count == 4 and client.lent_count == 0
        monkeypatch.setattr(tier, "read", type(tier).read.__get__(tier))
        status, _, got = await read_back(store, client, 0, 4)
        assert status == bytes(4) and got == data(0, 4, 1)
    finally:
        await store.aclose()


async def test_overlapping_puts_keep_each_others_writes_marked_in_flight(
        redis_cluster_session: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """An old session's put and a new session's put of the same page, then a put of
    another page: the old put finishing last must not unmark the other page's write."""
    store = make(redis_cluster_session)
    real_write = store.backend.tier.write
    gates = {seq: threading.Event() for seq in (1, 2, 3)}
    arrived = {seq: threading.Event() for seq in (1, 2, 3)}

    def gated_write(client_id, seq, pages, data):  # type: ignore[no-untyped-def]
        arrived[seq].set()
        gates[seq].wait(5)
        return real_write(client_id, seq, pages, data)

    monkeypatch.setattr(store.backend.tier, "write", gated_write)
    try:
        client = attach(store)
        finished = {seq: trio.Event() for seq in (1, 2, 3)}

        async def put(first: int, seq: int) -> None:
            await store.put(client, first, seq, data(first, 1, seq))
            finished[seq].set()

        async def at_its_write(seq: int) -> None:
            assert await trio.to_thread.run_sync(arrived[seq].wait, 5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, 0, 1)  # the old session's
            await at_its_write(1)
            nursery.start_soon(put, 0, 2)  # the new session's
            await at_its_write(2)
            gates[2].set()
            await finished[2].wait()
            nursery.start_soon(put, 9, 3)
            await at_its_write(3)
            gates[1].set()
            await finished[1].wait()
            assert store.backend._being_written(client, 9, 3)
            gates[3].set()
        assert not store.backend._writing
    finally:
        for gate in gates.values():
            gate.set()
        await store.aclose()


async def test_a_put_cancelled_before_its_write_keeps_nothing(redis_cluster_session: LocalCluster) -> None:
    """A reconnect cancels the old session's put while it waits for a worker: the
    versions it recorded go, with the older ones they replaced."""
    store = make(redis_cluster_session)
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, data(0, 4, 1)) == bytes(4)
        store.backend._limiter = trio.CapacityLimiter(1)
        async with store.backend._limiter:  # every worker busy
            with trio.move_on_after(0.2):
                await store.put(client, 0, 2, data(0, 8, 2))
        assert client.count == 0 and store.pages == 0
        assert store.counters[HostCounter.REFUSED_TIER] == 8 and store.counters[HostCounter.STALE_DROPPED] == 4
        status, _, _ = await read_back(store, client, 0, 8)
        assert status == bytes([S.MISSING]) * 8
    finally:
        await store.aclose()


async def test_reads_give_up_at_the_deadline_however_long_an_attempt_takes(
        redis_cluster_session: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make(redis_cluster_session, read_timeout=0.5)
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, data(0, 4, 1)) == bytes(4)
        monkeypatch.setattr(store.backend.tier, "read", lambda *a: time.sleep(3))  # a node that hangs
        started = trio.current_time()
        with pytest.raises(RequestError, match="did not answer in 0.5s"):
            await read_back(store, client, 0, 4)
        assert trio.current_time() - started < 1.5
        assert store.backend.tier.counters[TierCounter.READ_FAILURES] == 1
        assert client.count == 4  # a page not read is not a page lost
    finally:
        await store.aclose()


async def test_the_delete_loop_outlives_an_unexpected_error(redis_cluster_session: LocalCluster,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = redis_cluster_session
    store = make(cluster)
    real_delete = store.backend.tier.delete
    calls = []

    def flaky(*args: object) -> int:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug in a dependency")
        return real_delete(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store.backend.tier, "delete", flaky)
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, data(0, 4, 1)) == bytes(4)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            assert await store.invalidate(client, 0, 4, 1) == 4
            with trio.fail_after(10):
                while store.backend._deletes:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert len(calls) >= 2 and store.backend.tier.counters[TierCounter.DELETE_RETRIES] >= 1
        assert fields(cluster, store, client, range(4)) == 0
    finally:
        await store.aclose()


# -- a cluster of the test's own: a master dies ----------------------------------------------


async def fill_every_master(store) -> tuple[Any, int]:
    """A client and 16 runs of its pages stored, so that every master holds some."""
    client = attach(store)
    n = 16 * RUN_PAGES
    for first in range(0, n, RUN_PAGES):
        assert await store.put(client, first, 1, data(first, RUN_PAGES, 1)) == bytes(RUN_PAGES)
    return client, n


async def test_reads_go_on_through_a_masters_death(redis_cluster: LocalCluster) -> None:
    cluster = redis_cluster
    store = make(cluster)
    try:
        client, n = await fill_every_master(store)
        victim = cluster.masters()[0]
        cluster.kill(victim)
        started = time.monotonic()
        status, _, got = await read_back(store, client, 0, n)  # waits out the failover
        assert status == bytes(n) and got == data(0, n, 1)
        assert time.monotonic() - started < store.backend.tier.config.read_timeout
        counters = store.backend.tier.counters
        assert counters[TierCounter.READ_RETRIES] >= 1 and counters[TierCounter.FAILOVERS] >= 1
        assert counters[TierCounter.LOST] == 0
        cluster.wait_failover(victim)
        store.backend.tier.poll_memory()  # what the store's memory watch does ten times a second
        # The promoted master takes new pages (it has no replica left: they are refused, not lost).
        statuses = b"".join([await store.put(client, first, 2, data(first, RUN_PAGES, 2))
                             for first in range(0, n, RUN_PAGES)])
        assert set(statuses) <= {S.STORED, S.REFUSED_REPLICATION, S.REFUSED_TIER}
        assert S.STORED in set(statuses)
        # The promoted master has no replica left: its pages are refused without a wait.
        assert counters[TierCounter.REFUSED_NO_REPLICA] > 0
        status, seqs, got = await read_back(store, client, 0, n)
        for i in range(n):
            if statuses[i] == S.STORED:
                assert status[i] == S.STORED and seqs[i] == 2
                assert got[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == page(i, 2)
            else:
                assert status[i] == S.MISSING
    finally:
        await store.aclose()


def _pages_on_the_master_of_page_0(tier, tier_id: int, n: int) -> tuple[str, list[int]]:  # type: ignore[no-untyped-def]
    """The master holding page 0 of a client, and which of its first ``n`` pages it holds."""
    victim = tier.node_of(tier.key(tier_id, 0)).name
    return victim, [p for p in range(n) if tier.node_of(tier.key(tier_id, p // RUN_PAGES)).name == victim]


async def _all_and_only_handed_back(store: Store, pages, handed: list[int],  # type: ignore[no-untyped-def]
                                    taken: dict[int, bytes]) -> None:
    """Every page of ``handed`` is handed back (and taken, at version 1), and only those."""
    with trio.fail_after(30):
        while any(pages.index.get(p) != NIL for p in handed):
            await trio.sleep(0.05)
    assert sorted(taken) == handed and all(taken[p] == page(p, 1) for p in handed)
    assert store.counters[HostCounter.HANDED_BACK_REPLICATION] == len(handed)


async def _read_back_runs(client, n: int, missing: list[int], newer: int) -> None:  # type: ignore[no-untyped-def]
    """Every run of ``n`` pages reads back: the runs starting in ``missing`` are missing,
    the others hold version 1, but for the first 8 pages of run ``newer`` (version 2)."""
    for first in range(0, n, RUN_PAGES):
        answer = await client.get(array("Q", range(first, first + RUN_PAGES)))
        if first in missing:
            assert answer.statuses == bytes([S.MISSING]) * RUN_PAGES  # handed back before
            continue
        version = 2 if first == newer else 1
        expected = data(first, 8, version) + data(first + 8, RUN_PAGES - 8, 1)
        assert answer.statuses == bytes(RUN_PAGES) and bytes(answer.data) == expected


async def test_a_master_whose_replica_never_synced(redis_cluster: LocalCluster, tmp_path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A master whose replica's first sync never finishes: its new pages are refused
    (replication) without being sent, the pages it holds are handed back to their
    client while it can be read, and once it is killed (its replica frozen, so that
    nobody serves its slots) the pages on the other masters still read back."""
    cluster = redis_cluster
    store = make(cluster, read_timeout=3.0)
    n = 16 * RUN_PAGES  # 16 runs: every master holds some
    taken: dict[int, bytes] = {}

    async def take_back(handback) -> bytes:  # type: ignore[no-untyped-def]
        for i, p in enumerate(handback.pages):
            taken[p] = bytes(handback.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        return bytes([TakeStatus.TAKEN]) * len(handback.pages)

    replica = None
    try:
        async with trio.open_nursery() as nursery:
            address, server = await start_server(nursery, str(tmp_path / "s"), store)
            await nursery.start(store.run, server)
            client = await start_client(nursery, address, npages=n)
            client.set_handlers(take_back, lambda: None)
            for first in range(0, n, RUN_PAGES):
                assert await client.put(first, 1, data(first, RUN_PAGES, 1)) == bytes(RUN_PAGES)
            pages = store.clients["c"]
            tier = store.backend.tier
            victim, on_victim = _pages_on_the_master_of_page_0(tier, pages.tier_id, n)
            victim_port = int(victim.rsplit(":", 1)[1])
            assert 0 < len(on_victim) < n
            replica = cluster.unsync_replica(victim_port)  # every page it held is handed back, and only those
            await _all_and_only_handed_back(store, pages, on_victim, taken)
            assert victim in tier.unreplicated and store.pages == n - len(on_victim)
            # Its new pages are refused at once, the other masters' are stored.
            first_elsewhere = next(p for p in range(0, n, RUN_PAGES) if p not in on_victim)
            assert await client.put(0, 2, data(0, 8, 2)) == bytes([S.REFUSED_REPLICATION]) * 8
            assert tier.counters[TierCounter.REFUSED_NO_REPLICA] == 8
            assert await client.put(first_elsewhere, 2, data(first_elsewhere, 8, 2)) == bytes(8)

            cluster.kill(replica, signal.SIGSTOP)  # it can never take over
            cluster.kill(victim_port)
            with trio.fail_after(30):
                while not cluster.failed(victim_port):
                    await trio.sleep(0.1)
            # The pages of the other masters still read back, at once.
            started = time.monotonic()
            await _read_back_runs(client, n, on_victim, first_elsewhere)
            assert time.monotonic() - started < tier.config.read_timeout
            assert tier.counters[TierCounter.LOST] == 0
            # The dead master misses its heartbeat (the others take it), and a sweep is
            # refused while a master does not answer: it might hold what says the store runs.
            failures = tier.counters[TierCounter.HEARTBEAT_FAILURES]
            assert store.backend.presence.beat() == 2 and tier.counters[TierCounter.HEARTBEAT_FAILURES] == failures + 1
            code, _, err = await trio.to_thread.run_sync(_sweep, capsys, cluster.address, store.instance)
            assert code == 1 and f"node {victim}" in err
            nursery.cancel_scope.cancel()
    finally:
        if replica is not None:
            cluster.kill(replica)
        await store.aclose()



async def test_a_node_that_is_no_confirmed_master_cannot_say_a_page_is_lost(redis_cluster: LocalCluster) -> None:
    """The review's finding: the tier's answer that a page is missing (or at another
    version) was taken as "page lost" whoever gave it, and the store dropped its record
    for good (EIO, SIGBUS).  With reads allowed while the cluster is down, an old master
    on the minority side or one restarted empty can answer.  Here the store's slot map
    points, as a map learned from a confused node would, at a node that answers reads
    but is no master: a replica restarted empty, its sync held back.  Its "missing"
    must not count: the store learns the slots again and asks the real master, within
    the read deadline, and every page reads back."""
    cluster = redis_cluster
    store = make(cluster)
    try:
        client, n = await fill_every_master(store)
        master = cluster.masters()[0]
        empty = cluster.unsync_replica(master)  # answers reads (READONLY), with nothing
        nodes = store.backend.tier.cluster.nodes_manager
        stale = ClusterNode("127.0.0.1", empty, server_type="replica")
        nodes.nodes_cache[stale.name] = stale
        store.backend.tier.cluster.read_from_replicas = True  # its connections say READONLY: it answers reads
        nodes.create_redis_connections([stale])
        moved = [slot for slot, serving in nodes.slots_cache.items() if serving[0].port == master]
        for slot in moved:
            nodes.slots_cache[slot] = [stale]
        status, seqs, got = await read_back(store, client, 0, n)
        assert status == bytes(n) and got == data(0, n, 1) and set(seqs) == {1}
        counters = store.backend.tier.counters
        assert counters[TierCounter.LOST] == 0 and client.count == n
        assert counters[TierCounter.READ_RETRIES] >= 1 and counters[TierCounter.UNCONFIRMED_READS] >= 1
    finally:
        await store.aclose()


async def test_a_hung_master_costs_only_its_own_heartbeat(redis_cluster: LocalCluster) -> None:
    """The review's finding: beat() wrote the masters one after another, each with the
    5 s socket timeout, so with a 1 s TTL one hung master let the others' heartbeats
    expire and tier-sweep took a running store for gone.  Now the others' heartbeats
    are written at once and beat() is back within one heartbeat interval; the hung
    master's write, still under way, is not started again."""
    cluster = redis_cluster
    store = make(cluster, heartbeat_ttl=1.0)
    tier = store.backend.tier
    masters = cluster.masters()
    frozen = masters[0]
    try:
        assert store.backend.presence.beat() == 3
        cluster.kill(frozen, signal.SIGSTOP)
        for attempt in range(2):  # the second finds the first's write to the frozen master unfinished
            started = time.monotonic()
            assert store.backend.presence.beat() == 2
            assert time.monotonic() - started < store.backend.presence.heartbeat_interval() + 0.1
            assert tier.counters[TierCounter.HEARTBEAT_FAILURES] == attempt + 1
        assert len(store.backend.presence._beating) == 1  # one thread for the frozen master, not one per beat
        for port in masters:
            if port != frozen:  # each live master holds a heartbeat with its TTL running
                keys = cluster.cli(port, "eval", f"return redis.call('keys', 'vswap:{{{tier.instance}.alive.*')", "0")
                [key] = keys.split()
                assert 0 < int(cluster.cli(port, "pttl", key)) <= 1000
    finally:
        cluster.kill(frozen, signal.SIGCONT)
        await store.aclose()


async def test_a_compressing_tiered_store_keeps_to_its_capacity_in_pages(redis_cluster_session: LocalCluster) -> None:
    """Its pages are in the cluster, not in size classes here: the capacity counts pages."""
    from pagewire.codec import Codec

    tier = connect(dataclasses.replace(parse_tier(redis_cluster_session.address), wait_timeout=3.0))
    store = tiered_store(Limits(capacity_pages=16), tier, compress=Codec.ZSTD)
    try:
        client = attach(store)
        out = await store.put(client, 0, 1, bytes(range(256)) * 16 * 32)
        assert out == bytes(16) + bytes([PageStatus.REFUSED_CAPACITY]) * 16
        assert store.pages == 16 and store.charged_pages() == 16
    finally:
        await store.aclose()


async def test_a_compressing_store_keeps_compressed_pages_in_the_cluster(redis_cluster_session: LocalCluster) -> None:
    """--compress with --tier: the cluster's values are the compressed pages, and every path
    (get, hand-back) gives back the page; a value that does not decode is EIO, never data."""
    from pagewire.codec import Codec
    from vswapctl.workload import json_pool

    pool = json_pool(5, 64 * PAGE_SIZE)
    pages = [i.to_bytes(8, "little") + pool[i * PAGE_SIZE + 8 : (i + 1) * PAGE_SIZE] for i in range(64)]
    cluster = redis_cluster_session
    tier = connect(dataclasses.replace(parse_tier(cluster.address), wait_timeout=3.0))
    store = tiered_store(Limits(capacity_pages=1 << 20), tier, compress=Codec.ZSTD)
    try:
        client = attach(store)
        assert await store.put(client, 0, 1, b"".join(pages)) == bytes(64)
        comp = store.stats()["tier"]["compression"]
        assert comp["algorithm"] == "zstd" and comp["orig_bytes_written"] == 64 * PAGE_SIZE
        assert comp["compr_bytes_written"] < comp["orig_bytes_written"] // 2
        status, seqs, got = await read_back(store, client, 0, 64)
        assert status == bytes(64) and set(seqs) == {1} and got == b"".join(pages)
        handback = await store.lend(client, HandBackCause.PRESSURE, 8)
        assert handback is not None and bytes(handback.data) == b"".join(pages[p] for p in handback.pages)
        store.unlend(client, handback)
        # Damage one value in the cluster behind the store's back.
        host, port = parse_tier(cluster.address).nodes[0]
        probe = RedisCluster(host=host, port=port)
        try:
            key = store.backend.tier.key(client.tier_id, 0)
            value = probe.hget(key, "5")
            probe.hset(key, "5", value[:SEQ_DIGITS + 1] + bytes(len(value) - SEQ_DIGITS - 1))
        finally:
            probe.close()
        answer = await get_answer(store, client, array("Q", [5, 6]))
        assert list(answer.seqs) == [0, 1] and bytes(answer.data[:PAGE_SIZE]) == bytes(PAGE_SIZE)
        assert bytes(answer.data[PAGE_SIZE:]) == pages[6] and store.counters[HostCounter.DECODE_ERRORS] == 1
    finally:
        await store.aclose()
