"""``vswapctl bench``'s pure parts: the workload's pages, arguments, medians and ratios, the
table, the JSON, the chart, and the run loop with fake targets.

Nothing here touches swap, loop devices, zram, FUSE or cgroups: an autouse fixture
makes every path that would fail the test instead.  The live bench is in test_swap.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vswapctl import bench, benchreport, benchtargets, cgroup, cli, system
from vswapctl.benchtargets import BenchError, Target
from vswapctl.cpuwatch import CpuWatch
from vswapctl.workload import PAGE, Pages

M = 1 << 20
RUN_WORKLOAD = bench.run_workload  # the real one (the autouse fixture below replaces it)


class _ByHand(CpuWatch):
    """A CpuWatch whose readings are taken by hand: at entry, once more, and at exit."""

    def __init__(self, pids: dict[str, int], clock: Iterator[float], figures: Iterator[float]) -> None:
        super().__init__(pids, read=lambda pid: next(figures), clock=lambda: next(clock))

    def __enter__(self) -> "_ByHand":
        self.take()
        self.take()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.take()


@pytest.fixture(autouse=True)
def nothing_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test gets wrong, no real device, command or cgroup is ever touched."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a pure test tried to touch the machine: {args!r}")

    for name in ("zram_swap", "loop_swap", "vswapfs_swap", "swap_on"):
        monkeypatch.setattr(benchtargets, name, refuse)
    monkeypatch.setattr(bench, "run_workload", refuse)
    monkeypatch.setattr(system, "run", refuse)
    monkeypatch.setattr(cgroup, "create", refuse)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # cmd_bench's handlers stay out of pytest


# -- the workload's pages ---------------------------------------------------------------


def test_incompressible_pages_do_not_compress() -> None:
    pages = Pages(seed=1234, npages=64, data="incompressible")
    for i in (0, 1, 2, 31, 63, 5000):
        page = pages.expected(i)
        assert len(page) == PAGE
        assert len(zlib.compress(page, 9)) >= 0.95 * PAGE, i
    # neighbours are different pages, not the same window
    assert pages.expected(0)[16:] != pages.expected(1)[16:]


def test_compressible_pages_compress_to_almost_nothing() -> None:
    pages = Pages(seed=1234, npages=64, data="compressible")
    assert all(len(zlib.compress(pages.expected(i))) < PAGE // 20 for i in range(64))


def test_json_pages_compress_as_application_data_does() -> None:
    """Between incompressible and a repeated cell: zlib at its fastest takes every page to
    between a quarter and two thirds of its size, and neighbouring pages differ."""
    pages = Pages(seed=1234, npages=64, data="json")
    sizes = [len(zlib.compress(pages.expected(i), 1)) for i in range(64)]
    assert all(PAGE // 4 < size < PAGE * 2 // 3 for size in sizes), sizes
    assert pages.expected(0)[16:] != pages.expected(1)[16:]
    assert b'"tags":[' in pages.expected(3)


@pytest.mark.parametrize("data", ["incompressible", "compressible", "json"])
def test_verify_catches_wrong_old_and_zero_pages(data: str) -> None:
    pages = Pages(seed=77, npages=64, data=data)
    older_run = Pages(seed=78, npages=64, data=data)
    assert pages.check(pages.expected(5), 5)
    assert not pages.check(pages.expected(6), 5)  # from another slot
    assert not pages.check(older_run.expected(5), 5)  # from an older run
    assert not pages.check(bytes(PAGE), 5)  # zeros
    assert not pages.check(bytes(PAGE), 0)
    flipped = bytearray(pages.expected(5))
    flipped[PAGE - 1] ^= 1
    assert not pages.check(bytes(flipped), 5)  # one bit, anywhere in the page


def test_pages_refuse_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="incompressible"):
        Pages(seed=1, npages=1, data="random")


@pytest.mark.parametrize("data", ["incompressible", "compressible", "json"])
def test_workload_runs_standalone(data: str) -> None:
    done = subprocess.run([sys.executable, "-m", "vswapctl.workload", "--size", "1M", "--data", data],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pages"] == 256 and result["bad_pages"] == 0 and result["data"] == data
    assert result["fill_seconds"] >= 0 and len(result["verify_seconds"]) == 2
    # each phase's [start, end] on the monotonic clock, in order, and its own CPU
    marks = result["marks"]
    assert len(marks) == 3 and all(a <= b for a, b in marks) and marks[0][1] <= marks[1][0] <= marks[2][0]
    assert len(result["cpu_seconds"]) == 3


# -- arguments --------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["bench", *argv])


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_defaults() -> None:
    args = parse()
    assert args.runs == 3 and args.targets is None and args.data == "incompressible"
    assert args.chart is None and args.small_capacity is None and not args.json


def test_targets_keep_their_order_once_each() -> None:
    assert parse("--targets", "loop, zram,loop").targets == ("loop", "zram")


@pytest.mark.parametrize("argv,needle", [
    (["--runs", "2"], "at least 3 runs"),
    (["--runs", "x"], "not a number of runs"),
    (["--targets", "zram,nfs"], "unknown target 'nfs'"),
    (["--targets", ","], "no target named"),
    (["--data", "zip"], "invalid choice"),
    (["--small-capacity", "1000"], "multiple of 4096"),
])
def test_argument_errors(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    line = parse_error(capsys, *argv)
    assert line.startswith("vswapctl bench: error:") and needle in line, line


def test_chart_without_matplotlib_fails_when_the_arguments_are_read(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    line = parse_error(capsys, "--chart", str(tmp_path / "bench.png"))
    assert "pip install 'vswapfs[chart]'" in line and "argument --chart" in line, line


def test_chart_path_checks_the_format_and_the_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert "end it in .png" in parse_error(capsys, "--chart", str(tmp_path / "bench.jpg"))
    assert "cannot write in" in parse_error(capsys, "--chart", str(tmp_path / "nowhere" / "bench.png"))
    assert parse("--chart", str(tmp_path / "bench.png")).chart == str(tmp_path / "bench.png")


def config(**changes: Any) -> bench.BenchConfig:
    base: dict[str, Any] = {"size": 256 * M, "limit": 64 * M, "device_size": 512 * M, "small_capacity": 64 * M}
    base.update(changes)
    return bench.BenchConfig(**base)


def test_check_config() -> None:
    assert bench.check_config(config()) == []
    assert any("--limit" in p for p in bench.check_config(config(limit=256 * M)))
    assert any("--device-size" in p for p in bench.check_config(config(device_size=128 * M)))
    assert any("--small-capacity" in p for p in bench.check_config(config(small_capacity=256 * M)))
    assert bench.check_config(config(small_capacity=256 * M, targets=("zram", "loop"))) == []
    assert any("--runs" in p for p in bench.check_config(config(runs=1)))


def test_cmd_bench_refuses_a_bad_configuration_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--size", "64M", "--limit", "64M"]) == 1
    assert "--limit must be below --size" in capsys.readouterr().err


def test_choose_targets() -> None:
    assert bench.choose_targets(None, {"zram": None}) == (list(bench.DEFAULT_TARGETS), {})
    missing = {"zram": "no zram here", "redis-cluster": "no redis-server"}
    chosen, skipped = bench.choose_targets(None, missing)
    assert chosen == ["loop", "inproc", "hoststore", "hoststore-small"] and skipped == missing
    assert bench.choose_targets(("loop", "inproc"), missing) == (["loop", "inproc"], {})
    with pytest.raises(BenchError, match="no zram here"):
        bench.choose_targets(("zram", "loop"), missing)
    with pytest.raises(BenchError, match="target redis-cluster: no redis-server"):
        bench.choose_targets(("redis-cluster",), missing)


# -- medians, ratios, the report --------------------------------------------------------


def sample(fill: float, seq: float, rnd: float, **extra: Any) -> dict[str, Any]:
    return {"fill": fill, "verify_seq": seq, "verify_random": rnd, "device": "/dev/x", **extra}


SAMPLES = {
    "zram": [sample(1.0, 0.5, 2.0), sample(3.0, 0.7, 2.2), sample(2.0, 0.6, 9.0)],
    "loop": [sample(4.0, 1.0, 4.0), sample(4.0, 2.0, 5.0), sample(5.0, 1.5, 4.5)],
    "inproc": [sample(2.0, 1.0, 4.0), sample(2.0, 1.0, 4.0), sample(2.0, 1.0, 4.0)],
    "hoststore-small": [sample(8.0, 3.0, 8.0, pages_to_store=10, pages_to_backing=30),
                        sample(6.0, 2.0, 6.0, pages_to_store=12, pages_to_backing=28),
                        sample(7.0, 2.5, 7.0, pages_to_store=11, pages_to_backing=29)],
}
PARAMS = {"size": 256 * M, "limit": 64 * M, "device_size": 512 * M, "small_capacity": 64 * M, "runs": 3,
          "data": "incompressible", "targets": list(SAMPLES)}


def test_medians() -> None:
    meds = benchreport.medians(SAMPLES)
    assert list(meds) == list(SAMPLES)  # the order the targets ran in
    assert meds["zram"] == {"fill": 2.0, "verify_seq": 0.6, "verify_random": 2.2, "runs": 3}
    assert meds["loop"]["verify_seq"] == 1.5
    assert meds["hoststore-small"]["pages_to_store"] == 11 and meds["hoststore-small"]["pages_to_backing"] == 29
    assert "pages_to_store" not in meds["zram"]
    even = benchreport.medians({"t": [sample(1.0, 1.0, 1.0), sample(2.0, 3.0, 5.0)], "none": []})
    assert even == {"t": {"fill": 1.5, "verify_seq": 2.0, "verify_random": 3.0, "runs": 2}}


def test_ratios_to_zram_and_inproc() -> None:
    ratios = benchreport.ratios(benchreport.medians(SAMPLES))
    assert set(ratios) == {"vs_zram", "vs_inproc"}
    assert ratios["vs_zram"]["zram"] == {"fill": 1.0, "verify_seq": 1.0, "verify_random": 1.0}
    assert ratios["vs_zram"]["loop"] == {"fill": 2.0, "verify_seq": 2.5, "verify_random": round(4.5 / 2.2, 3)}
    assert ratios["vs_inproc"]["hoststore-small"] == {"fill": 3.5, "verify_seq": 2.5, "verify_random": 1.75}
    assert ratios["vs_inproc"]["zram"]["fill"] == 1.0


def test_ratios_without_a_baseline_and_with_a_zero_one() -> None:
    no_zram = {k: v for k, v in SAMPLES.items() if k != "zram"}
    assert set(benchreport.ratios(benchreport.medians(no_zram))) == {"vs_inproc"}
    assert benchreport.ratios(benchreport.medians({"loop": SAMPLES["loop"]})) == {}
    zero = benchreport.medians({"zram": [sample(0.0, 0.5, 1.0)], "loop": [sample(1.0, 1.0, 1.0)]})
    assert benchreport.ratios(zero)["vs_zram"]["loop"] == {"fill": None, "verify_seq": 2.0, "verify_random": 1.0}


def test_report_json_shape() -> None:
    report = benchreport.build(SAMPLES, PARAMS, {"hoststore": "because"})
    again = json.loads(json.dumps(report))
    assert again == report
    assert set(report) == {"params", "skipped", "medians", "ratios", "runs"}
    assert report["skipped"] == {"hoststore": "because"}
    assert report["params"]["data"] == "incompressible"
    assert set(report["medians"]) == set(SAMPLES)
    for target in SAMPLES:
        assert set(benchreport.PHASES) | {"runs"} <= set(report["medians"][target])
        assert set(report["ratios"]["vs_zram"][target]) == set(benchreport.PHASES)
        assert len(report["runs"][target]) == 3 and report["runs"][target][0]["device"] == "/dev/x"


def test_table() -> None:
    table = benchreport.format_table(benchreport.build(SAMPLES, PARAMS, {"hoststore": "because"}))
    lines = table.splitlines()
    assert lines[0].startswith("median seconds over 3 interleaved runs (256M of incompressible data in a 64M")
    assert lines[1].split() == ["target", "fill", "verify_seq", "verify_random"]
    assert lines[2].split() == ["zram", "2.000", "0.600", "2.200"]
    assert "skipped hoststore: because" in lines
    assert "hoststore-small: 11 pages to the store, 29 to the backing file (median per run)" in lines
    zram_at = lines.index(next(line for line in lines if line.startswith("ratio to zram")))
    assert lines[zram_at + 2].split() == ["zram", "1.00x", "1.00x", "1.00x"]
    assert lines[zram_at + 3].split() == ["loop", "2.00x", "2.50x", f"{round(4.5 / 2.2, 3):.2f}x"]
    assert any(line.startswith("ratio to inproc") for line in lines)
    # columns line up: every row of a table as wide as its header
    assert len({len(line) for line in lines[1:6]}) == 1


def test_table_without_baselines() -> None:
    table = benchreport.format_table(benchreport.build({"loop": SAMPLES["loop"]}, PARAMS))
    assert "ratio to" not in table and "loop" in table


def test_memory_per_byte_is_reported_with_its_ratio_to_zram(tmp_path: Path) -> None:
    samples = {"zram": [sample(1.0, 1.0, 1.0, data_per_mem=v) for v in (1.5, 1.6, 1.7)],
               "hoststore-zstd": [sample(1.0, 1.0, 1.0, data_per_mem=v) for v in (2.4, 2.0, 2.5)],
               "loop": [sample(1.0, 1.0, 1.0)]}
    report = benchreport.build(samples, PARAMS)
    assert report["medians"]["zram"]["data_per_mem"] == 1.6 and "data_per_mem" not in report["medians"]["loop"]
    lines = benchreport.format_table(report).splitlines()
    at = lines.index("memory: bytes of pages held per byte of memory at the fullest (median; higher is better)")
    assert lines[at + 2].split() == ["zram", "1.60", "1.00x"]
    assert lines[at + 3].split() == ["hoststore-zstd", "2.40", "1.50x"]
    pytest.importorskip("matplotlib")
    benchreport.write_chart(report, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000


def cpu(fill: dict[str, float], seq: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    return {"fill": fill, "verify_seq": seq or {}, "verify_random": {}}


def test_cpu_per_phase_is_reported_with_the_cores_it_kept_busy() -> None:
    samples = {"floor": [sample(1.0, 1.0, 1.0, cpu=cpu({"workload": w, "floorfs": f})) for w, f in
                         ((0.8, 0.2), (0.9, 0.3), (0.7, 0.25))],
               "hoststore": [sample(2.0, 1.0, 1.0, cpu=cpu({"workload": 1.0, "vswapfs": v, "hoststore": h},
                                                             {"vswapfs": 0.5})) for v, h in
                             ((0.4, 0.5), (0.6, 0.5), (0.5, 0.7))],
               "zram": [sample(1.0, 1.0, 1.0)]}
    report = benchreport.build(samples, PARAMS | {"cores": 2})
    meds = report["medians"]
    assert meds["floor"]["cpu"]["fill"] == {"workload": 0.8, "floorfs": 0.25}
    assert meds["hoststore"]["cpu"]["fill"] == {"workload": 1.0, "vswapfs": 0.5, "hoststore": 0.5}
    assert meds["hoststore"]["cpu"]["verify_seq"] == {"vswapfs": 0.5}
    assert "cpu" not in meds["zram"]
    lines = benchreport.format_table(report).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("CPU seconds per phase"))
    assert "(this machine has 2)" in lines[at]
    assert lines[at + 1].split() == ["target", "phase", "workload", "floorfs", "vswapfs", "hoststore", "sum",
                                     "cores", "busy"]
    assert lines[at + 2].split() == ["floor", "fill", "0.800", "0.250", "-", "-", "1.050", "1.05"]
    assert lines[at + 5].split() == ["hoststore", "fill", "1.000", "-", "0.500", "0.500", "2.000", "1.00"]
    assert lines[at + 6].split() == ["hoststore", "verify_seq", "-", "-", "0.500", "-", "0.500", "0.50"]
    section = lines[at : lines.index("", at)]
    assert len(section) == 8 and not any("zram" in line for line in section)  # nothing measured there


def test_a_phases_cpu_is_read_off_the_daemons_readings_at_its_marks() -> None:
    from vswapctl.cpuwatch import CpuWatch
    clock = iter([0.0, 10.0, 20.0])
    figures = iter([0.0, 2.0, 3.0])
    watch = CpuWatch({"vswapfs": 1}, read=lambda pid: next(figures), clock=lambda: next(clock))
    for _ in range(3):
        watch.take()
    got = bench.phase_cpu([[0.0, 5.0], [5.0, 15.0], [15.0, 20.0]], [0.3, 0.2, 0.1], watch)
    assert got == {"fill": {"workload": 0.3, "vswapfs": 1.0}, "verify_seq": {"workload": 0.2, "vswapfs": 1.5},
                   "verify_random": {"workload": 0.1, "vswapfs": 0.5}}
    assert bench.phase_cpu([[0.0, 20.0]] * 3, None, watch)["fill"] == {"vswapfs": 3.0}  # redis: no own figure


def test_zram_memory_is_sampled_at_its_fullest(tmp_path: Path) -> None:
    memory = benchtargets.ZramMemory("zram-test")
    memory.path = str(tmp_path / "mm_stat")
    for data, mem in ((100, 60), (400, 250), (300, 100), (400, 240), (0, 0)):
        (tmp_path / "mm_stat").write_text(f"{data} 50 {mem} 0 {mem} 0 0 0 0\n")
        memory.sample()
    assert (memory.data_bytes, memory.mem_bytes) == (400, 240)
    assert benchtargets.fullest(400, 240) == {"data_bytes_fullest": 400, "mem_bytes_fullest": 240,
                                             "data_per_mem": round(400 / 240, 3)}


def test_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name in ("bench.png", "bench.svg"):
        path = tmp_path / name
        benchreport.write_chart(benchreport.build(SAMPLES, PARAMS), str(path))
        assert path.stat().st_size > 1000
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare.png"  # no baseline, no samples: still a chart
    benchreport.write_chart({"medians": benchreport.medians({"loop": SAMPLES["loop"]})}, str(bare))
    assert bare.stat().st_size > 1000


# -- the run loop, with fake targets ----------------------------------------------------


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    events: list[str] = []

    @contextmanager
    def fake_target(name: str, workdir: str, device_size: int, small_capacity: int, say: Any) -> Iterator[Target]:
        assert workdir.startswith(str(tmp_path))
        events.append(f"up {name}")
        try:
            yield Target(f"/dev/fake-{name}", lambda: {"pages_to_store": 1, "pages_to_backing": 2}
                         if name.startswith("hoststore") else {},
                         lambda: {"vswapfs": 1, "hoststore": 2} if name.startswith("hoststore") else {})
        finally:
            events.append(f"down {name}")

    calls = iter(range(1000))

    def fake_workload(size: int, limit: int, data: str, daemons: dict[str, int], cpu: int | None) -> dict[str, float]:
        n = next(calls)
        events.append(f"workload {data} {sorted(daemons)}" + ("" if cpu is None else f" on {cpu}"))
        if n == 4 and "fail" in events:  # the fifth: run 3 of the first target
            raise BenchError("workload failed (1): boom")
        return {"fill": 1.0 + n, "verify_seq": 0.5, "verify_random": 2.0}

    monkeypatch.setattr(bench, "open_target", fake_target)
    monkeypatch.setattr(bench, "run_workload", fake_workload)
    monkeypatch.setattr(bench, "check_workdir", lambda d: None)
    monkeypatch.setattr(bench, "WORKDIR_PARENT", str(tmp_path))
    monkeypatch.setattr(bench, "zram_missing", lambda name="zram": "no zram here")
    monkeypatch.setattr(bench, "redis_missing", lambda: "no redis-server here")
    return events


def test_runs_are_interleaved_and_every_target_is_taken_down(fake_run: list[str], tmp_path: Path) -> None:
    said: list[str] = []
    report = bench.bench(config(targets=None), said.append)
    targets = ["loop", "inproc", "hoststore", "hoststore-small"]  # zram: none here
    ups = [e.split()[1] for e in fake_run if e.startswith("up ")]
    assert ups == targets * 3
    assert sum(e.startswith("workload incompressible") for e in fake_run) == 12
    # each run is told which processes serve its target, to read their CPU
    assert fake_run.count("workload incompressible ['hoststore', 'vswapfs']") == 6  # hoststore, -small
    assert fake_run.count("workload incompressible []") == 6
    assert all(fake_run[i].startswith("up") and fake_run[i + 2].startswith("down") for i in range(0, 36, 3))
    assert said[0] == "skipping zram: no zram here"
    assert said[1] == "skipping redis-cluster: no redis-server here"
    said.pop(1)
    assert said[1] == "run 1/3 loop: setting up"
    assert said[2].startswith("run 1/3 loop (/dev/fake-loop): fill 1.00s  verify_seq 0.50s  verify_random 2.00s")
    assert "[1/12," in said[2]
    assert "pages to store 1, to backing file 2" in said[8]
    assert report["skipped"] == {"zram": "no zram here", "redis-cluster": "no redis-server here"}
    assert report["params"]["targets"] == targets
    assert report["medians"]["loop"]["fill"] == 5.0  # runs 1, 5, 9
    assert set(report["ratios"]) == {"vs_inproc", "vs_hoststore"}
    assert report["medians"]["hoststore"]["pages_to_backing"] == 2
    assert list(tmp_path.iterdir()) == []  # its work directory is gone


def test_a_failed_run_still_takes_its_target_down(fake_run: list[str], tmp_path: Path) -> None:
    fake_run.append("fail")
    with pytest.raises(BenchError, match="boom"):
        bench.bench(config(targets=("loop", "inproc"), data="compressible"), lambda m: None)
    assert fake_run[-3:] == ["up loop", "workload compressible []", "down loop"]
    assert fake_run.count("up loop") + fake_run.count("up inproc") == \
        fake_run.count("down loop") + fake_run.count("down inproc")
    assert list(tmp_path.iterdir()) == []


def test_cmd_bench_json_keeps_stdout_for_the_report(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_bench(cfg: bench.BenchConfig, say: Any) -> dict[str, Any]:
        seen["cfg"] = cfg
        say("run 1/3 loop: setting up")
        return benchreport.build(SAMPLES, PARAMS)

    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["bench", "--json", "--targets", "loop,inproc", "--size", "128M", "--limit", "32M"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["medians"]["zram"]["fill"] == 2.0
    assert "vswapctl: run 1/3 loop: setting up" in err
    assert seen["cfg"].small_capacity == 32 * M and seen["cfg"].targets == ("loop", "inproc")
    assert seen["cfg"].runs == 3 and seen["cfg"].data == "incompressible"

    assert cli.main(["bench", "--data", "compressible"]) == 0  # the table, progress on stdout
    out, err = capsys.readouterr()
    assert "vswapctl: run 1/3 loop: setting up" in out and "ratio to zram" in out and err == ""
    assert seen["cfg"].small_capacity == 64 * M and seen["cfg"].targets is None

    if benchreport.matplotlib_missing() is None:
        chart = tmp_path / "bench.png"
        assert cli.main(["bench", "--json", "--chart", str(chart)]) == 0
        assert chart.read_bytes()[:4] == b"\x89PNG" and "chart written to" in capsys.readouterr().err


def test_vswapctl_workload_takes_the_data_kind_and_refuses_no_pass(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["workload", "--data", "json"])
    assert args.data == "json" and args.passes == 2 and args.size == 256 << 20
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["workload", "--passes", "0"])
    assert "--passes" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_the_redis_dataset_round_trips_and_catches_a_wrong_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from vswapctl import redisload

    result = redisload.run(2 << 20, seed=7)
    assert result["pages"] == 2048 and result["bad_pages"] == 0 and result["data"] == "redis"
    assert result["redis_used_memory"] > 2 << 20 and len(result["verify_seconds"]) == 2
    real, calls = redisload.value, []

    def value(pool: bytes, seed: int, key: int) -> bytes:  # key 5 is expected to be other than it was stored
        calls.append(key)
        return real(pool, seed, key) if key != 5 or calls.count(5) == 1 else b"not what was stored"

    monkeypatch.setattr(redisload, "value", value)
    assert redisload.run(1 << 20, seed=7)["bad_pages"] == 2  # found wrong in both passes


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_a_signal_while_redis_server_starts_stops_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vswapctl import redisload

    fake = tmp_path / "bin" / "redis-server"  # first on PATH: starts, never answers
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    started: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        proc = real_popen(*args, **kwargs)
        started.append(proc.pid)
        return proc

    def signalled(seconds: float) -> None:
        raise SystemExit(128 + signal.SIGTERM)  # what redisload's handler raises

    monkeypatch.setattr(redisload.subprocess, "Popen", popen)
    monkeypatch.setattr(redisload.time, "sleep", signalled)
    with pytest.raises(SystemExit):
        redisload.start(str(tmp_path))
    assert started and not os.path.exists(f"/proc/{started[0]}")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_a_signal_to_the_redis_dataset_stops_its_redis_server_too(tmp_path: Path) -> None:
    import glob
    import time

    before = set(glob.glob("/tmp/vswapctl-redisload-*"))
    proc = subprocess.Popen([sys.executable, "-m", "vswapctl.redisload", "--size", "1G"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        children: list[str] = []
        while not children:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
            time.sleep(0.05)
        time.sleep(0.5)  # filling
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
        for pid in left:  # broken, the test must not leave them running either
            os.kill(int(pid), signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not left, "redis-server outlived its dataset"
    assert set(glob.glob("/tmp/vswapctl-redisload-*")) <= before  # its directory went with it


@pytest.mark.skipif(os.geteuid() != 0, reason="the floor target runs floorfs as root does")
def test_a_floorfs_that_cannot_start_is_an_error_at_once_with_its_words(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="floorfs did not mount.*usage|floorfs did not mount.*MOUNTPOINT"):
        with benchtargets.floor_swap(4096 * 3 + 1, str(tmp_path)):  # not whole pages: floorfs refuses
            pytest.fail("swapped on")
    assert not system.mounts_under(str(tmp_path)) and not system.loops_under(str(tmp_path))


def test_the_workload_runs_on_the_cpu_asked_for(tmp_path: Path) -> None:
    """MemoryCgroup.run with ``cpus``: the child joins the cgroup (a file here) and runs on them alone."""
    (tmp_path / "cgroup.procs").write_text("")
    cg = cgroup.MemoryCgroup(str(tmp_path), 1)
    cpu = min(os.sched_getaffinity(0))
    done = cg.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], cpus={cpu})
    assert done.stdout.strip() == f"[{cpu}]"
    assert (tmp_path / "cgroup.procs").read_text().strip().isdigit()  # it joined before exec
    anywhere = cg.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"])
    assert anywhere.stdout.strip() == str(sorted(os.sched_getaffinity(0)))


def test_a_workload_cpu_this_process_cannot_use_is_refused() -> None:
    outside = max(os.sched_getaffinity(0)) + 1
    assert any(f"--workload-cpu {outside} is not a CPU" in p for p in bench.check_config(config(workload_cpu=outside)))
    assert bench.check_config(config(workload_cpu=min(os.sched_getaffinity(0)))) == []
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--workload-cpu", "-1"])
    assert cli.build_parser().parse_args(["bench", "--workload-cpu", "1"]).workload_cpu == 1


def test_the_workload_cpu_reaches_every_run(fake_run: list[str]) -> None:
    bench.bench(config(targets=("loop", "hoststore"), workload_cpu=0), lambda m: None)
    runs = [e for e in fake_run if e.startswith("workload")]
    assert len(runs) == 6 and all(e.endswith(" on 0") for e in runs)


def test_run_workload_puts_each_phases_cpu_in_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_workload with a fake cgroup: the workload's marks and own CPU, the daemons' readings."""
    marks = [[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]
    line = json.dumps({"bad_pages": 0, "fill_seconds": 1.0, "verify_seconds": [1.0, 1.0], "marks": marks,
                       "cpu_seconds": [0.4, 0.3, 0.2]})
    asked: dict[str, Any] = {}

    class FakeCgroup:
        def run(self, argv: list[str], cpus: set[int] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
            asked["cpus"] = cpus
            return subprocess.CompletedProcess(argv, 0, line + "\n", "")

        def remove(self) -> None:
            asked["removed"] = True

    monkeypatch.setattr(bench, "run_workload", RUN_WORKLOAD)
    monkeypatch.setattr(cgroup, "create", lambda name, limit: FakeCgroup())
    clock = iter([1.0, 3.0, 4.0])  # readings at the start, mid-run and the end: 0.0, 1.0, 1.5 s of CPU
    figures = iter([0.0, 1.0, 1.5])
    monkeypatch.setattr(bench, "CpuWatch", lambda pids: _ByHand(pids, clock, figures))
    sample = bench.run_workload(256 * M, 64 * M, "json", {"vswapfs": 7}, 1)
    assert asked == {"cpus": {1}, "removed": True}
    assert sample["fill"] == 1.0
    assert sample["cpu"]["fill"]["workload"] == 0.4 and sample["cpu"]["verify_random"]["workload"] == 0.2
    assert sample["cpu"]["verify_seq"]["vswapfs"] == 0.5


def test_a_workload_that_cannot_start_on_its_cpu_is_a_bench_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class FailingCgroup:
        def run(self, argv: list[str], **kw: Any) -> Any:
            raise subprocess.SubprocessError("Exception occurred in preexec_fn.")

        def remove(self) -> None:
            pass

    monkeypatch.setattr(bench, "run_workload", RUN_WORKLOAD)
    monkeypatch.setattr(cgroup, "create", lambda name, limit: FailingCgroup())
    with pytest.raises(BenchError, match="could not start in its cgroup on CPU 3: Exception occurred in preexec_fn"):
        bench.run_workload(256 * M, 64 * M, "json", {}, 3)
