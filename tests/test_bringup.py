"""``vswapctl up``'s bring-up without mounting anything: how the daemons are started
(nothing from the caller's directory).  The live counterpart (a real ``up`` from a
poisoned directory) is in test_device.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vswapctl import cli, device, launch
from vswapctl.state import State

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A module of these names in the working directory would shadow the standard library, a
# dependency or the project itself for `python -m` run there.
POISONED_NAMES = ("argparse", "trio", "json", "hoststore", "vswapfs")


@pytest.fixture
def poisoned_dir(tmp_path, monkeypatch) -> str:
    """The working directory, holding modules that record that they ran, then fail."""
    marker = tmp_path / "MARKER"
    work = tmp_path / "work"
    work.mkdir()
    for name in POISONED_NAMES:
        (work / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ran\\n')\n"
                                         f"raise SystemExit('poisoned {name}')\n")
    monkeypatch.chdir(work)
    return str(marker)


# -- 7: no code from the caller's directory -------------------------------------------------------


@pytest.mark.parametrize("module", ["hoststore", "vswapfs"])
def test_the_daemons_up_starts_run_nothing_from_its_working_directory(module: str, poisoned_dir: str,
                                                                       tmp_path) -> None:
    """`--help` of each daemon, started by the very helper up uses, from a directory holding
    an argparse.py, a trio.py, ...: it works, and none of them ran."""
    log = str(tmp_path / f"{module}.log")
    proc = device._spawn(module, ["--help"], log)
    assert proc.wait(60) == 0, open(log).read()
    with open(log) as f:
        assert f"usage: {module}" in f.read()
    assert not os.path.exists(poisoned_dir), open(poisoned_dir).read()


@pytest.mark.parametrize("module", ["vswapctl", "vswapctl.workload"])
def test_other_python_children_run_nothing_from_the_working_directory(module: str, poisoned_dir: str) -> None:
    """The workload (vswapctl workload, bench) and the rest go through the same launch."""
    done = subprocess.run(launch.module_argv(module, "--help"), cwd=launch.WORKDIR, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    assert not os.path.exists(poisoned_dir), open(poisoned_dir).read()


def test_the_bench_store_runs_nothing_from_the_working_directory(poisoned_dir: str) -> None:
    from vswapctl.benchstore import bench_store

    with bench_store("vswapctl-launchtest-", "--capacity", "4M") as (store, sock, _dir):
        assert store.poll() is None and os.path.exists(sock)
    assert not os.path.exists(poisoned_dir), open(poisoned_dir).read()


class _Started(Exception):
    """Raised by the stand-in for Popen: nothing is really started."""


@pytest.mark.parametrize("start", ["hoststore", "vswapfs"])
def test_up_starts_each_daemon_isolated_in_the_root_directory(start: str, tmp_path, monkeypatch) -> None:
    """What up hands to Popen for each daemon: python -I, the project's own tree appended to its
    path, cwd /, and only absolute paths."""
    seen: list[tuple[list[str], str | None]] = []

    def popen(argv: list[str], *args: object, cwd: str | None = None, **kwargs: object) -> None:
        seen.append((list(argv), cwd))
        raise _Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    st = State(str(tmp_path), mountpoint=str(tmp_path / "mnt"), backing=str(tmp_path / "backing"),
               host=f"unix:{tmp_path}/host.sock")
    cfg = device.UpConfig(size=1 << 20, backing=st.backing, mountpoint=st.mountpoint, capacity=1 << 20)
    starter = device._start_hoststore if start == "hoststore" else device._start_vswapfs
    with pytest.raises(_Started):
        starter(st, cfg, device.Undo(), lambda message: None)
    [(argv, cwd)] = seen
    assert cwd == "/"
    assert argv[:3] == [sys.executable, "-I", "-c"] and argv[4:6] == [launch.SOURCE_ROOT, start], argv
    paths = [a.removeprefix("unix:") for a in argv[6:] if "/" in a]
    assert paths and all(os.path.isabs(p) for p in paths), argv


def test_up_hands_the_daemons_absolute_paths_only(tmp_path, monkeypatch) -> None:
    """The daemons run in /: a state directory, socket or pressure file named relative to
    where vswapctl runs must reach them absolute."""
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["--state-dir", "st", "up", "--size", "1M", "--host", "unix:s/host.sock",
                                          "--pressure-source", "file:p/used", "--backing", "b/backing"])
    cfg = cli.up_config(args)
    assert args.state_dir == f"{tmp_path}/st"
    assert cfg.host == f"unix:{tmp_path}/s/host.sock"
    assert cfg.pressure_source == f"file:{tmp_path}/p/used"
    assert cfg.backing == f"{tmp_path}/b/backing" and cfg.mountpoint == f"{tmp_path}/st/mnt"
    for host, source in (("tcp:127.0.0.1:7070", "psutil"), ("inproc", None)):
        args = cli.build_parser().parse_args(["up", "--host", host] + (["--pressure-source", source] if source else []))
        cfg = cli.up_config(args)
        assert (cfg.host, cfg.pressure_source) == (host, source)


def test_every_python_child_of_the_project_goes_through_launch() -> None:
    """Nothing starts `sys.executable` by hand (`-m` or `-c` in the caller's directory) but
    vswapctl.launch.  The one exception, vswapctl/mounted.py (the FUSE-level test harness and
    `vswapctl faults`), runs its children in the source tree itself (cwd=REPO), never in the
    caller's directory: its tests hand the daemons shims through PYTHONPATH, which -I would drop."""
    allowed = {os.path.join("vswapctl", "launch.py"), os.path.join("vswapctl", "mounted.py")}
    offenders = []
    for package in ("hoststore", "vswapfs", "vswapctl"):
        for name in sorted(os.listdir(os.path.join(TOP, package))):
            path = os.path.join(package, name)
            if name.endswith(".py") and path not in allowed:
                with open(os.path.join(TOP, path)) as f:
                    offenders += [f"{path}:{n}" for n, line in enumerate(f, 1) if "sys.executable" in line]
    assert not offenders, offenders
