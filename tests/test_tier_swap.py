"""Live swap, as root, through a hoststore whose pages live on a local Redis Cluster
(3 masters, 3 replicas): a verifying workload while one master is killed with
SIGKILL.  Teardown always runs (``vswapctl down``, then the cluster)."""

from __future__ import annotations

from vswapctl.state import State

from .rediscluster import LocalCluster
import json
import subprocess
import sys

from .test_swap import pytestmark, stats, up, vswapctl, wait_until  # noqa: F401
from .test_swap import state_dir  # noqa: F401 (the fixture)


# The cluster comes first, so that it goes last: the device is down before it stops.
def test_live_swap_on_the_cluster_survives_a_masters_sigkill(redis_cluster: LocalCluster, state_dir: str,  # noqa: F811
                                                            disk_dir: str) -> None:
    up(state_dir, disk_dir, "--priority", "32000", "--tier", redis_cluster.address, capacity="512M")
    state = State.load(state_dir)
    assert state is not None
    # Half the other live tests' workload: every page through the cluster costs a round trip more.
    work = subprocess.Popen([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "workload",
                             "--size", "128M", "--limit", "32M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: stats(state_dir)["hoststore"]["pages_stored"] > 4096, 120, "pages on the cluster", work)
        victim = redis_cluster.masters()[0]
        redis_cluster.kill(victim)
        out, err = work.communicate(timeout=600)
    finally:
        if work.poll() is None:
            work.kill()
            work.wait()
    assert work.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pages"] == 32768 and result["bad_pages"] == 0
    redis_cluster.wait_failover(victim)
    s = stats(state_dir)
    fs, host = s["vswapfs"], s["hoststore"]
    tier = host["tier"]
    assert tier["tier_failovers"] >= 1, tier  # the store saw a master replaced
    # The promoted master has no replica left: the pages it held were handed back to vswapfs.
    assert host["handed_back_replication"] > 0, host
    assert tier["tier_lost"] == 0 and tier["tier_written"] > 4096
    assert fs["pages_lost"] == 0 and fs["checksum_errors"] == 0
    assert fs["io_errors"] == 0 and fs["read_failures"] == 0
    assert fs["host_reads"] > 0
    # While a read waits out the failover, later puts on the connection wait too: past
    # vswapfs's write timeout their pages go to the backing file (and are invalidated
    # here), though the store may accept them afterwards.
    late = fs["fallback_timeout"] + fs["fallback_unreachable"]
    assert fs["host_writes"] <= host["accepted"] <= fs["host_writes"] + late
    # Down: swap off (pages come back from the cluster), then the store drains and, at
    # exit, deletes every key it left.
    done = vswapctl(state_dir, "down", timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert redis_cluster.keys("vswap:*") == 0
