"""``vswapctl bench``: the verifying workload through several swap devices, measured in
one invocation, runs interleaved (A B C A B C ...) so that drift hits every target.

Three phases per run, from the workload's own clock: fill (swap-out), a
sequential verify pass (swap-in with readahead) and a random-order verify pass
(swap-in, page by page).  Each target is set up fresh for every run and taken
down after it (``vswapctl.benchtargets``); the report (``vswapctl.benchreport``)
has each phase's median per target and the ratios to zram and to ``inproc``,
and where each phase's CPU went: the workload and each daemon serving the
target (``vswapctl.cpuwatch``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import benchreport, cgroup, launch, system
from .cpuwatch import CpuWatch
from .benchtargets import (
    TARGETS,
    BenchError,
    check_workdir,
    open_target,
    state_dirs,
    zram_missing,
    DEFAULT_TARGETS,
    ZRAM_TARGETS,
)
from .rediscluster import redis_missing
from .state import State
from .workload import DATA_KINDS as WORKLOAD_KINDS

DATA_KINDS = (*WORKLOAD_KINDS, "redis")  # redis: a redis-server's dataset (vswapctl.redisload)

__all__ = [
    "DATA_KINDS",
    "DEFAULT_TARGETS",
    "MIN_RUNS",
    "TARGETS",
    "BenchConfig",
    "BenchError",
    "bench",
    "check_config",
    "choose_targets",
    "parse_runs",
    "parse_targets",
    "run_workload",
]

PAGE = 4096
MIN_RUNS = 3
WORKDIR_PARENT = "/var/tmp"  # on disk on any sane system; checked (never tmpfs) before anything is made there

Say = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    size: int  # the workload's memory
    limit: int  # its memory cgroup's limit
    device_size: int  # every target's size; the capacity of inproc and hoststore
    small_capacity: int  # hoststore-small's store capacity, below the workload
    runs: int = MIN_RUNS
    targets: tuple[str, ...] | None = None  # None: every target this machine has
    data: str = "incompressible"
    workload_cpu: int | None = None  # the CPU the workload is kept on (None: wherever the scheduler puts it)


# -- arguments -----------------------------------------------------------------------


def parse_targets(text: str) -> tuple[str, ...]:
    """``--targets a,b,...``: known names, in the order given, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no target named; choose from {','.join(TARGETS)}")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target {', '.join(map(repr, unknown))}; choose from {','.join(TARGETS)}")
    return tuple(dict.fromkeys(names))


def parse_runs(text: str) -> int:
    try:
        runs = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of runs") from None
    if runs < MIN_RUNS:
        raise ValueError(f"at least {MIN_RUNS} runs (got {runs}): a median of fewer is one run's noise")
    return runs


def check_config(cfg: BenchConfig) -> list[str]:
    """What makes this configuration pointless or unsafe, before anything runs."""
    problems = []
    if cfg.runs < MIN_RUNS:
        problems.append(f"--runs must be at least {MIN_RUNS}")
    if cfg.data not in DATA_KINDS:
        problems.append(f"--data must be one of {', '.join(DATA_KINDS)}")
    if cfg.limit >= cfg.size:
        problems.append("--limit must be below --size, or nothing is swapped")
    if cfg.device_size < cfg.size:
        problems.append("--device-size must be at least --size: every page the workload swaps must fit")
    if cfg.workload_cpu is not None and cfg.workload_cpu not in os.sched_getaffinity(0):
        problems.append(f"--workload-cpu {cfg.workload_cpu} is not a CPU this process may run on "
                        f"({', '.join(map(str, sorted(os.sched_getaffinity(0))))})")
    targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS
    if "hoststore-small" in targets and not 0 < cfg.small_capacity < cfg.size:
        problems.append("--small-capacity must be above 0 and below --size (the point of hoststore-small)")
    for name, value in (("--size", cfg.size), ("--limit", cfg.limit), ("--device-size", cfg.device_size),
                        ("--small-capacity", cfg.small_capacity)):
        if value <= 0 or value % PAGE:
            problems.append(f"{name} must be a positive multiple of {PAGE}")
    return problems


def choose_targets(asked: Sequence[str] | None, missing: dict[str, str | None]
                   ) -> tuple[list[str], dict[str, str]]:
    """(targets to run, {skipped target: why}).  By default every default target, those
    this machine lacks (``missing``: target -> why, or None) skipped; one asked for by
    name that is missing is an error."""
    if asked is None:
        skipped = {name: why for name, why in missing.items() if why and name in DEFAULT_TARGETS}
        return [t for t in DEFAULT_TARGETS if t not in skipped], skipped
    for name in asked:
        why = missing.get(name)
        if why:
            raise BenchError(f"target {name}: {why}")
    return list(asked), {}


# -- running -------------------------------------------------------------------------


def run_workload(size: int, limit: int, data: str, daemons: dict[str, int] | None = None,
                 cpu: int | None = None) -> dict[str, Any]:
    """The workload in a fresh memory cgroup of ``limit`` (on CPU ``cpu`` only, if given):
    seconds per phase, and under the key ``cpu`` each phase's CPU seconds: the
    workload's own and each of ``daemons``' (name: pid), the processes serving the target."""
    cg = cgroup.create(f"vswapctl-bench-{os.getpid()}", limit)
    try:
        argv = launch.module_argv("vswapctl.redisload", "--size", str(size)) if data == "redis" else \
            launch.module_argv("vswapctl.workload", "--size", str(size), "--passes", "2", "--data", data)
        with CpuWatch(daemons or {}) as watch:
            try:
                done = cg.run(argv, cwd=launch.WORKDIR, cpus=None if cpu is None else {cpu})
            except (OSError, subprocess.SubprocessError) as exc:  # the CPU went offline, the cgroup went
                raise BenchError(f"the workload could not start in its cgroup"
                                 f"{'' if cpu is None else f' on CPU {cpu}'}: {exc}") from None
    finally:
        cg.remove()
    if done.returncode != 0:
        raise BenchError(f"workload failed ({done.returncode}): {done.stdout.strip()} {done.stderr.strip()[-300:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["bad_pages"]:
        raise BenchError(f"{result['bad_pages']} bad pages")
    seq, rnd = result["verify_seconds"]
    sample: dict[str, Any] = {"fill": result["fill_seconds"], "verify_seq": seq, "verify_random": rnd}
    if "marks" in result:
        sample["cpu"] = phase_cpu(result["marks"], result.get("cpu_seconds"), watch)
    return sample


def phase_cpu(marks: Sequence[Sequence[float]], own: Sequence[float] | None,
              watch: CpuWatch) -> dict[str, dict[str, float]]:
    """Per phase, CPU seconds by process: the workload's own (where it measured them: a
    redis dataset's are redis-server's, not measured) and each watched daemon's."""
    out: dict[str, dict[str, float]] = {}
    for i, (phase, (start, end)) in enumerate(zip(benchreport.PHASES, marks)):
        entry = {"workload": float(own[i])} if own is not None and i < len(own) else {}
        entry.update(watch.between(start, end))
        out[phase] = entry
    return out


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(run: int, runs: int, name: str, sample: dict[str, Any], step: int, steps: int,
                  elapsed: float) -> str:
    line = f"run {run}/{runs} {name} ({sample.get('device', '?')}): " + \
        "  ".join(f"{phase} {sample[phase]:.2f}s" for phase in benchreport.PHASES)
    if "pages_to_store" in sample and "pages_to_backing" in sample:
        line += f"; pages to store {sample['pages_to_store']}, to backing file {sample['pages_to_backing']}"
    if "data_per_mem" in sample:
        line += f"; {sample['data_per_mem']:.2f} bytes of pages per byte of memory at the fullest"
    if "zram_mem_used_max" in sample:
        line += f"; zram used at most {sample['zram_mem_used_max'] / (1 << 20):.0f}M of RAM"
    left = (steps - step) * elapsed / step
    return line + f"  [{step}/{steps}, {_clock(elapsed)}" + (f", about {_clock(left)} left]" if left else "]")


def bench(cfg: BenchConfig, say: Say) -> dict[str, Any]:
    """Every chosen target, ``cfg.runs`` times, interleaved; the report.  ``say``: progress."""
    problems = check_config(cfg)
    if problems:
        raise BenchError("; ".join(problems))
    missing = {name: zram_missing(name) for name in ZRAM_TARGETS} | {"redis-cluster": redis_missing()}
    targets, skipped = choose_targets(cfg.targets, missing)
    for name, reason in skipped.items():
        say(f"skipping {name}: {reason}")
    if not targets:
        raise BenchError("no target to run")
    check_workdir(WORKDIR_PARENT)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="vswapctl-bench-", dir=WORKDIR_PARENT))
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    steps = cfg.runs * len(targets)
    started = time.monotonic()
    try:
        for i in range(cfg.runs):
            for name in targets:
                say(f"run {i + 1}/{cfg.runs} {name}: setting up")
                with open_target(name, workdir, cfg.device_size, cfg.small_capacity, say) as target:
                    sample: dict[str, Any] = dict(run_workload(cfg.size, cfg.limit, cfg.data, target.daemons(),
                                                                cfg.workload_cpu))
                    sample["device"] = target.device
                    sample.update(target.report())
                samples[name].append(sample)
                step = i * len(targets) + targets.index(name) + 1
                say(progress_line(i + 1, cfg.runs, name, sample, step, steps, time.monotonic() - started))
    finally:
        # Removed only when nothing lives there any more: a live device's state and
        # backing file are what a later `vswapctl down` needs.
        live = [d for d in state_dirs(workdir) if State.load(d) is not None]
        if not live and not system.loops_under(workdir) and not system.mounts_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"leaving {workdir} in place: a device there is still up"
                + "".join(f" (vswapctl --state-dir {d} down)" for d in live))
    params = asdict(cfg)
    params["targets"] = targets
    params["cores"] = len(os.sched_getaffinity(0))  # the CPUs the bench, and so its workload, may use
    params["seconds"] = round(time.monotonic() - started, 1)
    return benchreport.build(samples, params, skipped)
