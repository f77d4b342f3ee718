"""The offload controller live, as root: a workload with a hot and a cold half in a memory
cgroup, vswapfs as swap, ``vswapctl offload`` until SIGTERM.  Teardown (the controller, the
workload, the cgroup, then the device) runs pass or fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vswapctl import cgroup

from .conftest import swap_unavailable
from .test_swap import state_dir as state_dir  # noqa: F401 (a fixture: the device is always taken down)
from .test_swap import stats, up

pytestmark = [pytest.mark.swap, pytest.mark.skipif(swap_unavailable() is not None, reason=str(swap_unavailable())),
              pytest.mark.skipif(not os.path.exists(os.path.join(cgroup.V1_ROOT, "memory.limit_in_bytes")),
                                 reason="the live offload test reads cgroup v1's files")]

HERE = os.path.dirname(os.path.abspath(__file__))
FOUND = 1 << 30  # the cgroup's limit before the controller: it must be there again after


def _ticks(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [x for x in map(json.loads, filter(str.strip, f)) if x.get("kind") == "tick"]
    except FileNotFoundError:
        return []


def _until(predicate, what: str, *procs: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{p.args} exited ({p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def test_offload_moves_the_cold_half_out_keeps_the_hot_half_and_restores_the_limit(
        state_dir: str, disk_dir: str) -> None:  # noqa: F811
    up(state_dir, disk_dir, "--priority", "32000", capacity="256M")
    cg = cgroup.create("vswapctl-offload-test", FOUND)
    metric, record = os.path.join(disk_dir, "metric.json"), os.path.join(disk_dir, "offload.jsonl")
    work = ctl = None
    try:
        def join() -> None:
            with open(cg.procs, "w") as f:
                f.write(str(os.getpid()))

        work = subprocess.Popen([sys.executable, os.path.join(HERE, "hotcold.py"), "32", "96", metric],
                                preexec_fn=join, stdout=subprocess.PIPE, text=True)
        assert work.stdout is not None and work.stdout.readline().strip() == "ready"
        ctl = subprocess.Popen([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "offload", cg.path,
                                "--interval", "1", "--step", "0.1", "--floor", "56M", "--record", record,
                                "--workload-metric", metric], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        # 128M of data: pushed until three ticks in a row sit at the floor.
        _until(lambda: [x["action"] for x in _ticks(record)][-3:] == ["at the floor"] * 3, "push to the floor",
               work, ctl)
        work.send_signal(signal.SIGUSR1)
        where = json.loads(work.stdout.readline())
        ctl.send_signal(signal.SIGTERM)
        out, err = ctl.communicate(timeout=60)
        assert ctl.returncode == 0, out + err
        with open(os.path.join(cg.path, "memory.limit_in_bytes")) as f:
            assert int(f.read()) == FOUND
        with open(record) as f:
            end = [json.loads(line) for line in f][-1]
        assert end["kind"] == "end" and end["restored"] and end["reason"] == "stopped by SIGTERM"
        assert "the limit found, 1073741824, is in place" in out
        work.send_signal(signal.SIGTERM)
        verified = json.loads(work.communicate(timeout=300)[0].strip().splitlines()[-1])
        assert work.returncode == 0 and verified["bad_pages"] == 0
        print(f"in swap at the floor: {where}")
        assert where["cold_swapped"] >= 0.6, where  # most of the cold half moved out
        assert where["hot_swapped"] <= 0.2, where  # the hot half stayed in
        ticks = _ticks(record)
        assert ticks[-1]["usage"] < 0.6 * max(x["usage"] for x in ticks)
        assert all(x["oom_kills"] == 0 for x in ticks)
        fs = stats(state_dir)["vswapfs"]
        assert fs["host_writes"] > 0 and fs["checksum_errors"] == 0 and fs["read_failures"] == 0
    finally:
        _stop(ctl)
        _stop(work)
        cg.remove()
