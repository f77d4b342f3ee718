"""The offload controller (offload/): its law on numbers, the cgroup files of v1 and v2
on a fake tree, the loop on a fake kernel and a fake clock, the report, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from offload import psi, report
from offload.cgroupfs import UNLIMITED, Cgroup, CgroupError, resolve, swap_free
from offload.controller import SENPAI, SWAPIN_SLO, Controller, Settings
from offload.law import BACK_OFF, PROBE, WAIT, ProbeBackoff, Tuning

M = 1 << 20
SWAPS_HEADER = "Filename\tType\tSize\tUsed\tPriority\n"


# -- the law ----------------------------------------------------------------------


def test_law_waits_an_interval_then_probes_by_the_full_step_when_nothing_stalls() -> None:
    law = ProbeBackoff(Tuning(interval=6, step=0.01), now=0)
    assert [law.tick(t, 0, 10_000).action for t in range(1, 6)] == [WAIT] * 5
    d = law.tick(6, 0, 10_000)
    assert d.action == PROBE and d.factor == pytest.approx(-0.01)
    assert law.tick(7, 0, 10_000).action == WAIT  # the next probe waits a whole interval again


def test_law_probes_more_gently_as_the_signal_nears_the_budget() -> None:
    law = ProbeBackoff(Tuning(interval=1, step=0.01), now=0)
    far = law.tick(1, 100, 10_000).factor  # 1/100 of the budget: beyond 1/coeff_probe
    near = law.tick(2, 5_000, 10_000).factor  # half the budget: (2/10)**2 of the step
    assert far == pytest.approx(-0.01)
    assert near == pytest.approx(-0.01 * (2 / 10) ** 2)


def test_law_backs_off_at_once_when_the_integral_passes_the_budget() -> None:
    law = ProbeBackoff(Tuning(interval=6), now=0)
    assert law.tick(1, 6_000, 10_000).action == WAIT
    d = law.tick(2, 6_000, 10_000)  # 12 ms in two seconds: over the 10 ms budget, before the interval
    assert d.action == BACK_OFF and d.factor == pytest.approx((1.2 / 20) ** 2)
    assert law.integral == 0
    huge = ProbeBackoff(Tuning(max_backoff=1.0), now=0).tick(1, 10_000 * 100, 10_000)
    assert huge.factor == pytest.approx(1.0)  # capped: the limit at most doubles


def test_law_rejects_nonsense_tuning() -> None:
    for bad in (dict(interval=0), dict(step=0), dict(step=1), dict(coeff_probe=0)):
        with pytest.raises(ValueError):
            Tuning(**bad)


# -- PSI and the cgroup files ---------------------------------------------------------


def test_psi_totals_are_parsed_and_subtracted() -> None:
    a = psi.parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=1500\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=700\n")
    b = psi.parse("some avg10=1.00 avg60=0.00 avg300=0.00 total=4500\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=900\n")
    assert (b - a) == psi.Stall(3000, 200)
    with pytest.raises(ValueError):
        psi.parse("nothing here\n")


def v1_tree(root: Path, name: str = "work", usage: int = 300 * M) -> Path:
    path = root / "memory" / name
    path.mkdir(parents=True)
    files = {"memory.usage_in_bytes": usage, "memory.limit_in_bytes": 9223372036854771712,
             "memory.max_usage_in_bytes": usage + M, "memory.failcnt": 3, "memory.swappiness": 60,
             "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2",
             "memory.stat": "cache 0\nrss 1\nswap 8192\npgmajfault 1"}
    for name_, value in files.items():
        (path / name_).write_text(f"{value}\n")
    (root / "pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=100\n"
                                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=50\n")
    return path


def v2_tree(root: Path, name: str = "work", usage: int = 300 * M) -> Path:
    path = root / "unified" / name
    path.mkdir(parents=True)
    files = {"memory.current": usage, "memory.high": "max", "memory.swap.current": 4096, "memory.swap.max": "max",
             "memory.events": "low 0\nhigh 5\nmax 0\noom 1\noom_kill 1",
             "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
                                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0"}
    for name_, value in files.items():
        (path / name_).write_text(f"{value}\n")
    return path


def resolve_in(root: Path, name: str) -> Cgroup:
    return resolve(name, v1_root=str(root / "memory"), v2_root=str(root / "unified"),
                   machine_pressure=str(root / "pressure"))


def test_v1_files(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    cg = resolve_in(tmp_path, "work")  # relative to the hierarchy's root
    assert cg.version == 1 and cg.usage() == 300 * M and cg.limit() == UNLIMITED
    assert cg.oom_kills() == 2 and cg.limit_hits() == 3 and cg.swapped() == 8192 and cg.peak() == 301 * M
    assert cg.pressure_scope == "machine" and cg.stall() == psi.Stall(100, 50)
    assert cg.set_limit(200 * M + 123)  # page-aligned on the way in
    assert (Path(cg.path) / "memory.limit_in_bytes").read_text() == str(200 * M)


def test_v2_files(tmp_path: Path) -> None:
    path = v2_tree(tmp_path)
    cg = resolve_in(tmp_path, str(path))  # an absolute path
    assert cg.version == 2 and cg.limit() == UNLIMITED and cg.limit_text() == "max"
    assert cg.oom_kills() == 1 and cg.limit_hits() == 5 and cg.swapped() == 4096
    assert cg.pressure_scope == "cgroup" and cg.pressure_path == str(path / "memory.pressure")
    cg.set_limit("max")
    assert (path / "memory.high").read_text() == "max"


def test_resolve_refuses_roots_strangers_and_missing_cgroups(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CgroupError, match="root"):
        resolve_in(tmp_path, str(tmp_path / "memory"))
    with pytest.raises(CgroupError, match="not a memory cgroup"):
        resolve_in(tmp_path, str(tmp_path / "plain"))
    with pytest.raises(CgroupError, match="no cgroup"):
        resolve_in(tmp_path, "nowhere")


def test_no_swap_to_go_to_is_named(tmp_path: Path) -> None:
    swaps = tmp_path / "swaps"
    swaps.write_text(SWAPS_HEADER)
    cg1 = Cgroup(str(v1_tree(tmp_path)), resolve_in(tmp_path, "work").layout)
    assert "no swap" in (cg1.no_swap_reason(str(swaps)) or "")
    swaps.write_text(SWAPS_HEADER + "/dev/loop0 partition\t524284\t1000\t32000\n")
    assert swap_free(str(swaps)) == (524284 - 1000) * 1024
    assert cg1.no_swap_reason(str(swaps)) is None
    (Path(cg1.path) / "memory.swappiness").write_text("0\n")
    assert "swappiness 0" in (cg1.no_swap_reason(str(swaps)) or "")
    cg2 = resolve_in(tmp_path, str(v2_tree(tmp_path)))
    (Path(cg2.path) / "memory.swap.max").write_text("0\n")
    assert "may not swap" in (cg2.no_swap_reason(str(swaps)) or "")
    (Path(cg2.path) / "memory.swap.max").write_text("max\n")
    assert cg2.no_swap_reason(str(swaps)) is None
    (tmp_path / "unified" / "memory.swap.max").write_text("0\n")  # a parent that may not swap
    (tmp_path / "unified" / "memory.swap.current").write_text("0\n")
    assert "above it" in (cg2.no_swap_reason(str(swaps)) or "")


# -- the loop, on a fake kernel and a fake clock ------------------------------------------------


class FakeKernel:
    """A cgroup (v2, or v1) whose workload wants ``demand`` bytes and touches ``hot`` of
    them: its usage follows the limit, and a limit below the hot set stalls the workload
    (the pressure file's some total grows) in proportion to the shortfall.  ``sleep`` is
    the controller's: it moves the clock and lets the kernel react."""

    def __init__(self, root: Path, demand: int, hot: int, swap_free_bytes: int = 1 << 30,
                 version: int = 2, limit: str | None = None) -> None:
        self.version = version
        self.path = (v2_tree if version == 2 else v1_tree)(root, usage=demand)
        if limit is not None:
            (self.path / ("memory.high" if version == 2 else "memory.limit_in_bytes")).write_text(limit + "\n")
        self.cg = resolve_in(root, str(self.path))
        self.pressure = Path(self.cg.pressure_path)
        self.demand, self.hot, self.now, self.stall_us = demand, hot, 0.0, 0
        self.noise_us = 0  # stall every second whatever the limit (others', on v1's machine-wide PSI)
        self.oom_at: float | None = None
        self.oom_kills = 0
        self.swaps = root / "swaps"
        self.set_swap_free(swap_free_bytes)
        self.limits: list[int] = []
        self.events: list[tuple[Callable[[float], bool], Callable[[], None]]] = []

    def on(self, when: Callable[[float], bool], do: Callable[[], None]) -> None:
        """After each second, once the kernel has reacted: ``do()`` if ``when(now)``."""
        self.events.append((when, do))

    def set_swap_free(self, n: int) -> None:
        self.swaps.write_text(SWAPS_HEADER + f"/dev/loop0 partition\t{(1 << 40) >> 10}\t{((1 << 40) - n) >> 10}\t5\n")

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        limit = self.cg.limit()
        self.limits.append(limit)
        usage = min(self.demand, limit)
        (self.path / self.cg.layout.usage).write_text(f"{usage}\n")
        if usage < self.hot:
            self.stall_us += int((self.hot - usage) / self.hot * 1_000_000 * seconds)
        self.stall_us += int(self.noise_us * seconds)
        self.pressure.write_text(f"some avg10=0 avg60=0 avg300=0 total={self.stall_us}\n"
                                 f"full avg10=0 avg60=0 avg300=0 total={self.stall_us // 2}\n")
        if self.oom_at is not None and self.now >= self.oom_at:
            self.oom_kills, self.oom_at = self.oom_kills + 1, None
        events = f"high 0\noom_kill {self.oom_kills}\n" if self.version == 2 else \
            f"oom_kill_disable 0\nunder_oom 0\noom_kill {self.oom_kills}\n"
        (self.path / self.cg.layout.events).write_text(events)
        for when, do in self.events:
            if when(self.now):
                do()

    def controller(self, **settings: object) -> Controller:
        tuning = Tuning(interval=2, step=0.05)
        s = Settings(**{"tuning": tuning, "floor": 16 * M, **settings})  # type: ignore[arg-type]
        return Controller(self.cg, s, clock=self.clock, sleep=self.sleep, swaps=str(self.swaps))


@pytest.mark.parametrize("version", [1, 2])
def test_pushes_down_to_the_hot_set_and_hovers_there(tmp_path: Path, version: int) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=100 * M, version=version)
    found = k.cg.limit_text()
    outcome = k.controller().run(duration=600)
    settled = k.limits[len(k.limits) // 2:]
    assert min(settled) > 80 * M  # pushed, backed off near the hot set, never far below
    assert max(settled) < 160 * M  # most of the cold 300M stays out
    assert outcome.restored and k.cg.limit_text() == found


def test_stall_makes_it_back_off(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=100 * M)
    k.controller().run(duration=200)
    ups = sum(1 for a, b in zip(k.limits, k.limits[1:]) if b > a)
    assert ups > 0  # it loosened after the hot set stalled


def test_never_below_the_floor_even_one_not_on_a_page(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)  # nothing ever stalls: it would push to nothing
    k.controller(floor=120 * M + 123).run(duration=600)
    assert min(k.limits) >= 120 * M + 123
    assert min(k.limits) < 130 * M


def test_never_above_the_limit_found(tmp_path: Path) -> None:
    # A 20% probe cuts deep into a hot set just under the limit found: the stall it
    # causes doubles the limit at once, which the limit found caps.
    k = FakeKernel(tmp_path, demand=400 * M, hot=349 * M, limit=str(350 * M))
    ctl = k.controller(tuning=Tuning(interval=2, step=0.2))
    record = tmp_path / "rec.jsonl"
    with open(record, "w") as out:
        ctl.out = out
        ctl.run(duration=300)
    assert max(k.limits) == 350 * M
    actions = [x.get("action") for x in report.load(str(record))]
    assert "back off: limit found restored" in actions and "probe" in actions


def test_an_oom_kill_restores_the_limit_found_and_holds(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    k.oom_at = 30.0
    ctl = k.controller()
    record = tmp_path / "rec.jsonl"
    with open(record, "w") as out:
        ctl.out = out
        ctl.run(duration=60)
    ticks = [x for x in report.load(str(record)) if x["kind"] == "tick"]
    oom = next(i for i, x in enumerate(ticks) if x["action"].startswith("oom"))
    assert ticks[oom - 1]["limit"] is not None and ticks[oom - 1]["limit"] < 400 * M  # it had pushed
    assert ticks[oom + 1]["limit"] is None  # the limit found ("max") is back
    held = [x for x in ticks[oom + 1:] if x["t"] < ticks[oom]["t"] + 10 * 2]  # oom_hold intervals of 2 s
    assert len(held) >= 19
    assert all(x["action"] in ("wait", "hold (after an OOM kill)") for x in held)
    assert any(x["action"] == "probe" for x in ticks[oom + 1 + len(held):])  # and then it pushes again


def test_a_back_off_goes_no_higher_than_twice_the_peak(tmp_path: Path) -> None:
    # Once it has pushed, stall that no limit relieves (another process's, on v1's
    # machine-wide PSI) makes every tick a back-off: the limit doubles and doubles, up to
    # twice the peak (800M), where it stays; the limit found (none) would never stop it.
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    k.on(lambda now: now >= 3, lambda: setattr(k, "noise_us", 500_000))
    k.controller().run(duration=60)
    ours = [x for x in k.limits if x != UNLIMITED]
    assert ours[0] < 400 * M and max(ours) == 800 * M and ours[-1] == 800 * M


def test_a_back_off_never_tightens_and_a_probe_starts_at_most_at_twice_the_peak(tmp_path: Path) -> None:
    from offload.law import BACK_OFF, PROBE

    k = FakeKernel(tmp_path, demand=400 * M, hot=0, limit=str(4000 * M))
    ctl = k.controller()
    ctl.level = 4000 * M  # as after a back-off all the way to the limit found
    assert ctl._apply(PROBE, -0.2, ctl.sample()) == "probe"
    assert k.cg.limit() == 640 * M  # 80% of twice the peak (400M), not of the 4000M found
    k.cg.set_limit(1000 * M)  # a limit of ours above twice the peak (the peak was lower then)
    ctl.ours = 1000 * M
    assert ctl._apply(BACK_OFF, 0.5, ctl.sample()) == "back off"
    assert k.cg.limit() == 1000 * M  # capped at twice the peak, but never below where it was


def test_holds_while_swap_is_full(tmp_path: Path) -> None:
    # 30M free: more than the 16M margin, less than the margin and a 5% step of 400M (20M).
    k = FakeKernel(tmp_path, demand=400 * M, hot=0, swap_free_bytes=30 * M)
    k.controller().run(duration=30)
    assert set(k.limits) == {UNLIMITED}  # never tightened
    k2 = FakeKernel(tmp_path / "roomy", demand=400 * M, hot=0, swap_free_bytes=40 * M)
    k2.controller().run(duration=30)
    assert min(k2.limits) < 400 * M  # with room for the step, it pushes


@pytest.mark.parametrize("when", [1.0, 10.0])  # before its first write, and after
def test_a_limit_changed_by_someone_else_is_left_to_them(tmp_path: Path, when: float) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)

    def meddle() -> None:
        (k.path / "memory.high").write_text(f"{333 * M}\n")

    k.on(lambda now: now == when, meddle)
    outcome = k.controller().run(duration=60)
    assert "someone else" in outcome.reason and not outcome.restored
    assert (k.path / "memory.high").read_text().strip() == str(333 * M)


def test_interrupted_run_still_restores_the_limit(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)

    def interrupt() -> None:
        raise KeyboardInterrupt

    k.on(lambda now: now >= 20, interrupt)
    with pytest.raises(KeyboardInterrupt):
        k.controller().run()
    assert min(k.limits) < 400 * M  # it had pushed
    assert (k.path / "memory.high").read_text() == "max"


def test_a_cgroup_that_goes_away_ends_the_run_cleanly(tmp_path: Path) -> None:
    import shutil

    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    k.on(lambda now: now == 5, lambda: shutil.rmtree(k.path))
    outcome = k.controller().run(duration=60)
    assert "failed" in outcome.reason and not outcome.restored and outcome.ticks == 5


def test_v1_kernel_that_cannot_reclaim_keeps_the_old_limit_and_says_so(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import offload.cgroupfs

    path = v1_tree(tmp_path)
    cg = resolve_in(tmp_path, "work")
    real_write = os.write

    def busy(fd: int, data: bytes) -> int:
        if int(data) < 300 * M:  # lowering: the kernel cannot reclaim, and keeps the old limit
            real_write(fd, b"9223372036854771712")  # (opened O_TRUNC, which a cgroup file ignores)
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_write(fd, data)

    monkeypatch.setattr(offload.cgroupfs.os, "write", busy)
    clock = [0.0]
    ctl = Controller(cg, Settings(tuning=Tuning(interval=1), floor=M), clock=lambda: clock[0],
                     sleep=lambda s: clock.__setitem__(0, clock[0] + s), swaps=str(_swaps(tmp_path)))
    lines = []
    for _ in range(3):
        clock[0] += 1
        lines.append(ctl.tick())
    assert any("could not reclaim" in x["action"] for x in lines)
    assert (path / "memory.limit_in_bytes").read_text().strip() == "9223372036854771712"


def test_v1_cgroup_stuck_under_oom_gets_its_limit_back(tmp_path: Path) -> None:
    path = v1_tree(tmp_path)
    cg = resolve_in(tmp_path, "work")
    clock = [0.0]
    ctl = Controller(cg, Settings(tuning=Tuning(interval=1), floor=M), clock=lambda: clock[0],
                     sleep=lambda s: None, swaps=str(_swaps(tmp_path)))
    clock[0] = 1
    assert ctl.tick()["action"] == "probe"
    assert cg.limit() < 300 * M
    (path / "memory.oom_control").write_text("oom_kill_disable 1\nunder_oom 1\noom_kill 2\n")
    clock[0] = 2
    assert ctl.tick()["action"].startswith("oom: limit restored (the cgroup was stuck")
    assert (path / "memory.limit_in_bytes").read_text().strip() == "9223372036854771712"


def _swaps(root: Path) -> Path:
    p = root / "swaps"
    p.write_text(SWAPS_HEADER + "/dev/loop0 partition\t1048576\t0\t5\n")
    return p


def test_swapin_slo_backs_off_when_swapins_pass_the_budget(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    reads = [0]
    ctl = k.controller(controller=SWAPIN_SLO, slo=0.002)
    ctl.device = lambda: {"swapins": reads[0]}
    actions = []
    for _ in range(2):
        k.sleep(1)
        actions.append(ctl.tick()["action"])
    assert actions == ["wait", "probe"]  # no swap-ins: it pushes once the interval is up
    # 0.2% of ~100k pages per minute is ~400 pages in a 2 s interval... 5000 pages is far above.
    reads[0] += 5000
    k.sleep(1)
    assert ctl.tick()["action"] == "back off"


# -- the report and the command line --------------------------------------------------------


def _record(path: Path, usages: list[int], workload: float = 100.0) -> None:
    lines = [{"kind": "start", "controller": SENPAI, "peak": max(usages), "signals": {"pressure": "p"}}]
    for i, u in enumerate(usages):
        lines.append({"kind": "tick", "t": float(i), "usage": u, "limit": u, "peak": max(usages[: i + 1]),
                      "some_us": 1000, "full_us": 0, "oom_kills": 0, "swapins": 60 if i else 0,
                      "workload": {"ops_per_s": workload + i}, "device": {"store_pages": 7, "backing_pages": 1}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_figures(tmp_path: Path) -> None:
    rec = tmp_path / "a.jsonl"
    _record(rec, [100 * M] * 5 + [60 * M] * 5)
    s = report.summarize(report.load(str(rec)))
    assert s["peak_bytes"] == 100 * M and s["saved_settled"] == pytest.approx(0.4)
    assert s["psi_some"] == pytest.approx(9 * 1000 / 1e6 / 9)
    assert s["swapins_per_min"] == pytest.approx(4 * 60 / (4 / 60))
    assert s["promotion_rate"] == pytest.approx(s["swapins_per_min"] / (60 * M / 4096))
    assert s["workload"] == pytest.approx(107.0) and s["device"]["store_pages"] == 7
    rows = report.table([("vswapfs", s), ("zram", s)])
    assert rows[0] == ["", "vswapfs", "zram"] and any(r[1] == "40.00%" for r in rows)


def vswapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapctl", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_report_and_errors(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _record(a, [100 * M] * 10)
    _record(b, [100 * M] * 5 + [50 * M] * 5)
    done = vswapctl("offload", "--report", str(a), str(b), "--name", "off", "--name", "senpai")
    assert done.returncode == 0, done.stderr
    assert "senpai" in done.stdout.splitlines()[0] and "50.00%" in done.stdout
    assert vswapctl("offload", "--report", str(a), "--name", "x", "--name", "y").returncode == 1
    missing = vswapctl("offload", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no cgroup" in missing.stderr
    assert vswapctl("offload").returncode == 1
    assert vswapctl("offload", "x", "--step", "1.5").returncode == 2


def test_chart_and_plot_draw_a_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rec = tmp_path / "a.jsonl"
    _record(rec, [100 * M] * 5 + [60 * M] * 5)
    chart = tmp_path / "c.png"
    done = vswapctl("offload", "--report", str(rec), "--chart", str(chart))
    assert done.returncode == 0, done.stderr
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:4] == b"\x89PNG"
    plotted = tmp_path / "p.png"
    done = vswapctl("plot", str(rec), "-o", str(plotted))
    assert done.returncode == 0 and "offload run" in done.stdout, done.stderr
    assert plotted.read_bytes()[:4] == b"\x89PNG"


def test_swapin_slo_without_a_swapin_count_holds(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    ctl = k.controller(controller=SWAPIN_SLO)
    ctl.device = lambda: None  # the device's control socket did not answer
    ctl.run(duration=20)
    assert set(k.limits) == {UNLIMITED}


def test_holds_knows_whether_the_command_runs_inside_the_cgroup(tmp_path: Path) -> None:
    path = v2_tree(tmp_path)
    cg = resolve_in(tmp_path, str(path))
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/work\n")
    assert cg.holds(str(proc))
    proc.write_text("0::/work/inner\n")
    (path / "inner").mkdir()
    assert cg.holds(str(proc))
    proc.write_text("0::/elsewhere\n")
    assert not cg.holds(str(proc))


def test_missing_signals_are_named(tmp_path: Path) -> None:
    path = v1_tree(tmp_path)
    cg = resolve_in(tmp_path, "work")
    assert cg.missing_signals() == []
    (path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # before 4.13
    (tmp_path / "pressure").unlink()
    missing = cg.missing_signals()
    assert any(m.startswith("pressure") for m in missing) and any("4.13" in m for m in missing)


def test_a_second_controller_on_the_same_cgroup_is_refused(tmp_path: Path) -> None:
    from offload.claim import Claim, Claimed

    path = v2_tree(tmp_path)
    with Claim(str(path), run_dir=str(tmp_path / "run")) as first:
        first.note("max", 123 * M)
        with pytest.raises(Claimed, match="another vswapctl offload"):
            with Claim(str(path), run_dir=str(tmp_path / "run")):
                pass
    with Claim(str(path), run_dir=str(tmp_path / "run")) as again:  # released, and cleaned up
        assert again.left is None


def test_what_a_dead_controller_left_is_put_back_only_if_it_is_still_there(tmp_path: Path) -> None:
    from offload.claim import Claim

    path = v2_tree(tmp_path)
    with Claim(str(path), run_dir=str(tmp_path / "run")) as claim:
        claim.left = {"cgroup": claim.cgroup, "found": "max", "ours": 100 * M, "pending": 90 * M}
        assert claim.left_behind(100 * M) == "max"
        assert claim.left_behind(90 * M) == "max"  # killed while writing 90M: it may have landed
        assert claim.left_behind(333 * M) is None  # someone else's since
        claim.left = None
        assert claim.left_behind(100 * M) is None


def test_a_signal_after_the_kernel_took_a_limit_still_gets_the_limit_found_back(tmp_path: Path) -> None:
    # v2 sets memory.high, then reclaims; a signal during the reclaim ends the write after it took.
    from offload.controller import StopRequested

    k = FakeKernel(tmp_path, demand=400 * M, hot=0)
    notes: list[tuple[int | None, int | None]] = []
    ctl = k.controller()
    ctl.note = lambda found, ours, pending: notes.append((ours, pending))
    real = k.cg.set_limit

    def took_then_stopped(value: int | str) -> bool:
        real(value)
        if isinstance(value, int):
            raise StopRequested("stopped by SIGTERM")
        return True

    k.cg.set_limit = took_then_stopped  # type: ignore[method-assign]
    outcome = ctl.run(duration=60)
    assert outcome.reason == "stopped by SIGTERM" and outcome.restored
    assert k.cg.limit_text() == "max"
    assert notes[0][1] is not None and notes[0][1] < 400 * M  # noted before the write
    assert notes[-1] == (None, None)


def test_a_claim_is_kept_when_the_limit_found_could_not_be_put_back(tmp_path: Path) -> None:
    from offload.claim import Claim

    path = v2_tree(tmp_path)
    with Claim(str(path), run_dir=str(tmp_path / "run")) as claim:
        claim.note("max", 100 * M, None)
        claim.keep = True
    with Claim(str(path), run_dir=str(tmp_path / "run")) as again:
        assert again.left_behind(100 * M) == "max"
        again.left = {**(again.left or {}), "found": "4096; rm -rf"}
        assert again.left_behind(100 * M) is None  # not a limit: nothing of ours to write


def test_claims_live_in_run_as_root_and_in_the_users_runtime_dir_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from offload import claim

    monkeypatch.setattr(claim.os, "geteuid", lambda: 0)
    assert claim.default_run_dir() == claim.RUN_DIR
    monkeypatch.setattr(claim.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert claim.default_run_dir() == "/run/user/1000/vswapctl"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert claim.default_run_dir() == "/tmp/vswapctl-1000/vswapctl"


def test_report_reads_the_last_run_and_skips_a_cut_line(tmp_path: Path) -> None:
    rec = tmp_path / "a.jsonl"
    _record(rec, [50 * M] * 4)
    first = rec.read_text()
    _record(rec, [100 * M] * 5 + [60 * M] * 5)
    rec.write_text(first + rec.read_text() + '{"kind": "tick", "t": 99, "us')
    s = report.summarize(report.load(str(rec)))
    assert s["peak_bytes"] == 100 * M and s["saved_settled"] == pytest.approx(0.4)


# -- the command, in a process of its own, on a fake cgroup -----------------------------


def _offload(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``vswapctl offload`` with /proc/swaps and /run/vswapctl replaced by files of the test."""
    swaps = _swaps(tmp_path)
    code = ("import sys, offload.cgroupfs as c, offload.claim as k; "
            f"c.SWAPS = {str(swaps)!r}; k.default_run_dir = lambda: {str(tmp_path / 'run')!r}; "
            "from vswapctl.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, "--state-dir", str(tmp_path / "nostate"), "offload", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_the_command_puts_the_limit_back_on_a_signal(tmp_path: Path, signame: str) -> None:
    import signal
    import time

    path = v2_tree(tmp_path)
    rec = tmp_path / "rec.jsonl"
    proc = _offload(tmp_path, str(path), "--interval", "1", "--floor", "16M", "--record", str(rec), "--no-device")
    try:
        deadline = time.monotonic() + 60
        while (path / "memory.high").read_text().strip() == "max":  # its first probe
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no probe within 60 s"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (path / "memory.high").read_text().strip() == "max"
    end = report.load(str(rec))[-1]
    assert end["kind"] == "end" and end["restored"] and end["reason"] == f"stopped by {signame}"
    assert f"stopped by {signame}" in out and "is in place" in out
    assert not list((tmp_path / "run").iterdir())  # the claim is gone with it


def test_the_command_puts_back_what_a_killed_controller_left(tmp_path: Path) -> None:
    from offload.claim import Claim

    path = v2_tree(tmp_path)
    (path / "memory.high").write_text(f"{123 * M}\n")  # what a SIGKILLed controller had written
    with Claim(str(path), run_dir=str(tmp_path / "run")) as dead:
        dead.note("max", 123 * M)
        os.rename(dead.path, dead.path + ".kept")  # its exit removes the file; a SIGKILL would not
    os.rename(dead.path + ".kept", dead.path)
    proc = _offload(tmp_path, str(path), "--duration", "1", "--floor", "16M", "--no-device", "--quiet")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "died leaving" in out and "limit found, max, is in place" in out
    assert (path / "memory.high").read_text().strip() == "max"


def test_the_command_refuses_nonsense(tmp_path: Path) -> None:
    path = v2_tree(tmp_path)
    floor = _offload(tmp_path, str(path), "--floor", "0")
    assert floor.wait(timeout=60) == 1 and "floor" in floor.communicate()[1]
    (path / "memory.pressure").unlink()
    nopsi = _offload(tmp_path, str(path), "--floor", "16M")
    assert nopsi.wait(timeout=60) == 1 and "senpai needs memory pressure" in nopsi.communicate()[1]
    inf = vswapctl("offload", str(path), "--interval", "inf")
    assert inf.returncode == 1 and "finite" in inf.stderr
