"""An example suite for the vswapfs pytest plugin: installing vswapfs is enough for
these fixtures to exist.  Run as root: `pytest examples` (CI runs it)."""

from __future__ import annotations

import json
import sys


def workload(memory_cgroup, size: str = "96M", limit: str = "32M") -> dict:
    """A verifying workload bigger than its cgroup: its pages must go through swap."""
    done = memory_cgroup(limit).run([sys.executable, "-m", "vswapctl.workload", "--size", size])
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pages_come_back_from_the_host_store(vswap_device, memory_cgroup) -> None:
    result = workload(memory_cgroup)
    assert result["bad_pages"] == 0
    stats = vswap_device.stats()
    assert stats["vswapfs"]["host_writes"] > 0 and stats["hoststore"]["accepted"] > 0


def test_a_policy_change_sends_pages_to_the_backing_file(vswap_device, memory_cgroup) -> None:
    answer = vswap_device.set_policy("refuse-all")
    assert answer["policy"] == "refuse-all"
    before = vswap_device.stats()
    result = workload(memory_cgroup)
    after = vswap_device.stats()
    assert result["bad_pages"] == 0
    assert after["vswapfs"]["backing_writes"] > before["vswapfs"]["backing_writes"]
    assert after["hoststore"]["refused_policy"] > 0
    assert after["vswapfs"]["host_writes"] == before["vswapfs"]["host_writes"]
