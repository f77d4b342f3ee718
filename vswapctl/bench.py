"""``vswapctl bench``: the verifying workload through vswapfs against a baseline swap
device, measured in the same run, runs interleaved (A B A B ...) so drift hits both.

Three phases per run, from the workload's own clock: fill (swap-out), a
sequential verify pass (swap-in with readahead) and a random-order verify pass
(swap-in, page by page).  Reports the median of each phase over the runs and
the ratio vs the baseline (lower is better; 1.0 = as fast as the baseline).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

from . import cgroup, device, system
from .state import State

PHASES = ("fill", "verify_seq", "verify_random")


class BenchError(Exception):
    pass


def run_workload(size: int, limit: int) -> dict[str, float]:
    cg = cgroup.create(f"vswapctl-bench-{os.getpid()}", limit)
    try:
        done = cg.run([sys.executable, "-m", "vswapctl.workload", "--size", str(size), "--passes", "2"])
    finally:
        cg.remove()
    if done.returncode != 0:
        raise BenchError(f"workload failed ({done.returncode}): {done.stdout.strip()} {done.stderr.strip()[-300:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["bad_pages"]:
        raise BenchError(f"{result['bad_pages']} bad pages")
    seq, rnd = result["verify_seconds"]
    return {"fill": result["fill_seconds"], "verify_seq": seq, "verify_random": rnd}


@contextmanager
def swap_on(dev: str) -> Iterator[str]:
    system.run(["mkswap", dev])
    system.run(["swapon", "--priority", "32767", dev])
    try:
        yield dev
    finally:
        system.run(["swapoff", dev], timeout=1800)  # if this fails, nothing below is torn down


def _not_swapped_on(dev: str) -> None:
    if dev in system.swaps():
        raise BenchError(f"{dev} is still swapped on: leaving it in place")


@contextmanager
def zram_swap(size: int) -> Iterator[str]:
    with open("/sys/class/zram-control/hot_add") as f:
        index = f.read().strip()
    dev = f"/dev/zram{index}"
    try:
        with open(f"/sys/block/zram{index}/disksize", "w") as f:
            f.write(str(size))
        with swap_on(dev):
            yield dev
    finally:
        _not_swapped_on(dev)
        with open("/sys/class/zram-control/hot_remove", "w") as f:
            f.write(index)


@contextmanager
def loop_swap(size: int, workdir: str) -> Iterator[str]:
    path = os.path.join(workdir, "baseline-loop")
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    loop = system.run(["losetup", "--direct-io=on", "--find", "--show", path]).strip()
    try:
        with swap_on(loop):
            yield loop
    finally:
        _not_swapped_on(loop)
        system.run(["losetup", "-d", loop])
        os.unlink(path)


@contextmanager
def vswapfs_swap(size: int, capacity: int, workdir: str, say: Callable[[str], None]) -> Iterator[str]:
    state_dir = os.path.join(workdir, "state")
    cfg = device.UpConfig(size=size, backing=os.path.join(workdir, "backing"),
                          mountpoint=system.resolve_mountpoint(os.path.join(state_dir, "mnt")),
                          capacity=capacity, priority=32767)
    try:
        state = device.bring_up(state_dir, cfg, say)
    except device.UpFailed as exc:
        raise BenchError(f"vswapfs did not come up: {exc}") from None
    try:
        yield state.loop
    finally:
        if not device.take_down(state_dir, say):
            raise BenchError(f"vswapfs device in {state_dir} is still swapped on: left running")


def summarize(samples: dict[str, list[dict[str, float]]], baseline: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, runs in samples.items():
        out[target] = {phase: statistics.median(r[phase] for r in runs) for phase in PHASES}
        out[target]["runs"] = len(runs)
    if baseline and baseline in out:
        out["ratio_vs_" + baseline] = {
            phase: round(out["vswapfs"][phase] / out[baseline][phase], 2) if out[baseline][phase] else None
            for phase in PHASES
        }
    return out


def bench(size: int, limit: int, runs: int, device_size: int, capacity: int, baseline: str,
          say: Callable[[str], None]) -> dict[str, Any]:
    if baseline == "zram" and not os.path.exists("/sys/class/zram-control/hot_add"):
        raise BenchError("no zram here (modprobe zram, or use --baseline loop)")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="vswapctl-bench-", dir="/var/tmp"))
    quiet = (lambda m: None)
    targets: dict[str, Callable[[], Any]] = {"vswapfs": lambda: vswapfs_swap(device_size, capacity, workdir, quiet)}
    if baseline == "zram":
        targets["zram"] = lambda: zram_swap(device_size)
    elif baseline == "loop":
        targets["loop"] = lambda: loop_swap(device_size, workdir)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    try:
        for i in range(runs):
            for name, target in targets.items():
                with target() as dev:
                    result = run_workload(size, limit)
                samples[name].append(result)
                say(f"run {i + 1}/{runs} {name} ({dev}): " + ", ".join(f"{k} {v:.2f}s" for k, v in result.items()))
    finally:
        # Removed only when nothing lives there any more: a live device's state and
        # backing file are what a later `vswapctl down` needs.
        if State.load(os.path.join(workdir, "state")) is None and not system.loops_under(workdir) \
                and not system.mounts_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"leaving {workdir} in place: a device there is still up (vswapctl --state-dir "
                f"{workdir}/state down)")
    report = summarize(samples, baseline if baseline != "none" else None)
    report["params"] = {"size": size, "limit": limit, "device_size": device_size, "capacity": capacity,
                        "runs": runs}
    return report
