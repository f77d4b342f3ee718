"""A local Redis Cluster (3 masters, 3 replicas) for the page tier's tests, started
and stopped by ``tools/redis-cluster.sh`` (``vswapctl.rediscluster``); tests skip
with the reason where redis-server cannot be had."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vswapctl import rediscluster

from .conftest import disk_base

@dataclass
class LocalCluster:
    directory: str
    address: str
    base: int

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                              timeout=10).stdout

    def nodes(self) -> str:
        """CLUSTER NODES from the first node that answers."""
        for port in range(self.base, self.base + 6):
            out = self.cli(port, "cluster", "nodes")
            if out.strip():
                return out
        return ""

    def masters(self) -> list[int]:
        """The ports of the masters that serve (not failed)."""
        return [_port(line) for line in self.nodes().splitlines()
                if "master" in line.split()[2] and "fail" not in line.split()[2]]

    def replica_of(self, master: int) -> int:
        """The port of a master's replica."""
        lines = [line.split() for line in self.nodes().splitlines()]
        [master_id] = [fields[0] for fields in lines if _port(" ".join(fields)) == master]
        [replica] = [_port(" ".join(fields)) for fields in lines if fields[3] == master_id]
        return replica

    def failed(self, port: int) -> bool:
        """The cluster has marked this node failed (not merely suspected)."""
        return any(_port(line) == port and "fail" in line.split()[2].replace("fail?", "").split(",")
                   for line in self.nodes().splitlines())

    def unsync_replica(self, master: int, timeout: float = 30.0) -> int:
        """Restart a master's replica empty, the master holding back the full sync it
        then asks for: a replica whose first sync never finishes.  Its port."""
        replica = self.replica_of(master)
        for setting, value in [("repl-diskless-sync", "yes"), ("repl-diskless-sync-delay", "3600"),
                               ("repl-diskless-sync-max-replicas", "0")]:
            assert self.cli(master, "config", "set", setting, value).strip() == "OK", setting
        self.kill(replica)
        deadline = time.monotonic() + timeout
        while self.cli(replica, "ping").strip() == "PONG":  # until the kill has taken
            assert time.monotonic() < deadline, f"node {replica} outlived SIGKILL"
            time.sleep(0.05)
        # A replica keeps the copy its sync brought (dump.rdb, whatever `save` says): with
        # it, it would resume from the master's backlog instead of syncing from nothing.
        for name in os.listdir(os.path.join(self.directory, str(replica))):
            if name.endswith(".rdb"):
                os.unlink(os.path.join(self.directory, str(replica), name))
        self.restart(replica)
        while f"port={replica},state=wait_bgsave" not in self.cli(master, "info", "replication"):
            assert time.monotonic() < deadline, f"replica {replica} never asked {master} for a full sync"
            time.sleep(0.05)
        return replica

    def pid(self, port: int) -> int:
        with open(os.path.join(self.directory, str(port), "redis.pid")) as f:
            return int(f.read())

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """SIGKILL one node: no goodbye to anyone (or another signal: SIGSTOP freezes it)."""
        os.kill(self.pid(port), sig)

    def restart(self, port: int) -> None:
        """Start a stopped node again with its own settings (it rejoins from its nodes.conf)."""
        subprocess.run(["redis-server", os.path.join(self.directory, str(port), "redis.conf")], check=True,
                       capture_output=True, timeout=10)

    def set_maxmemory(self, value: str) -> None:
        for port in range(self.base, self.base + 6):
            self.cli(port, "config", "set", "maxmemory", value)

    def keys(self, pattern: str = "*") -> int:
        """Keys matching ``pattern`` on every serving master."""
        return sum(self.keys_by_master(pattern).values())

    def keys_by_master(self, pattern: str = "*") -> dict[int, int]:
        """Keys matching ``pattern`` on each serving master; an answer that is not a
        count fails (a zero must mean no key, not no answer)."""
        masters = self.masters()
        assert len(masters) == 3, f"the cluster serves from {masters}"
        counts = {p: self.cli(p, "eval", f"return #redis.call('keys', '{pattern}')", "0").strip() for p in masters}
        assert all(c.isdigit() for c in counts.values()), counts
        return {p: int(c) for p, c in counts.items()}

    def wait_failover(self, dead: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            masters = self.masters()
            if len(masters) == 3 and dead not in masters:
                return
            time.sleep(0.1)
        raise AssertionError(f"no failover of {dead} in {timeout}s")


def _port(line: str) -> int:
    """The port of a CLUSTER NODES line (``ID HOST:PORT@BUS FLAGS ...``)."""
    return int(line.split()[1].split(":")[1].split("@")[0])


def start_cluster(maxmemory: str = "256mb") -> LocalCluster:
    reason = rediscluster.redis_missing()
    if reason:
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="vswap-redis-", dir=disk_base())
    try:
        address, base = rediscluster.start(directory, maxmemory)
    except rediscluster.ClusterError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        if "apt-get install redis-server failed" in str(exc):
            pytest.skip(f"redis-server cannot be installed here: {exc}")
        raise
    return LocalCluster(directory, address, base)


def stop_cluster(cluster: LocalCluster) -> None:
    rediscluster.stop(cluster.directory)
    shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[LocalCluster]:
    """One cluster for the tests that leave it as they found it."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def redis_cluster() -> Iterator[LocalCluster]:
    """A cluster of the test's own (it may kill a node)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
