"""The pytest plugin, through pytester: it skips where it cannot run, and tears the
device down even after a failing test."""

from __future__ import annotations

import os

import pytest

from vswapctl import system

from .conftest import swap_unavailable

USES_DEVICE = """
def test_uses_a_device(vswap_device):
    assert vswap_device.loop
"""


def test_the_fixtures_skip_with_the_reason_when_not_root(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    pytester.makepyfile(USES_DEVICE + """
def test_uses_a_cgroup(memory_cgroup):
    memory_cgroup("16M")
""")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*vswap_device needs root*", "*memory_cgroup needs root*"])


def test_the_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--vswap-size*", "*--vswap-capacity*", "*--vswap-policy*"])


@pytest.mark.swap
@pytest.mark.skipif(swap_unavailable() is not None, reason=str(swap_unavailable()))
def test_a_failing_test_still_gets_its_device_taken_down(pytester: pytest.Pytester) -> None:
    swaps_before = set(system.swaps())
    pytester.makepyfile("""
import json, sys

def test_passes(vswap_device, memory_cgroup):
    with open("/proc/swaps") as f:
        assert vswap_device.loop in f.read()
    done = memory_cgroup("16M").run([sys.executable, "-m", "vswapctl.workload", "--size", "48M"])
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[-1])["bad_pages"] == 0
    assert vswap_device.stats()["vswapfs"]["host_writes"] > 0

def test_fails(vswap_device):
    with open("/proc/swaps") as f:
        assert vswap_device.loop in f.read()
    assert False, "a failing test"
""")
    result = pytester.runpytest_subprocess("--vswap-size", "128M", "--vswap-capacity", "16M",
                                           "--vswap-policy", "refuse-every:3")
    result.assert_outcomes(passed=1, failed=1)
    assert set(system.swaps()) == swaps_before  # both devices were taken down
    assert not [m for m in system.mounts_under("/var/tmp") if "vswap-pytest-" in m]
