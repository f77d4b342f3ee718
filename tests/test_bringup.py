"""``vswapctl up``'s bring-up without mounting anything: how the daemons are started
(nothing from the caller's directory), the mount point's lock, and the check that the
mount ``losetup`` will use is the one our own vswapfs serves.  The live counterparts
(a real ``up`` from a poisoned directory, two ``up``s racing on one mount point) are in
test_device.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from vswapctl import cli, device, launch, state
from vswapctl.commands import lifecycle
from vswapctl.state import Busy, MountLock, State

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
    proc = device.spawn_daemon(module, ["--help"], log)
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
    cfg = lifecycle.up_config(args)
    assert args.state_dir == f"{tmp_path}/st"
    assert cfg.host == f"unix:{tmp_path}/s/host.sock"
    assert cfg.pressure_source == f"file:{tmp_path}/p/used"
    assert cfg.backing == f"{tmp_path}/b/backing" and cfg.mountpoint == f"{tmp_path}/st/mnt"
    for host, source in (("tcp:127.0.0.1:7070", "psutil"), ("inproc", None)):
        args = cli.build_parser().parse_args(["up", "--host", host] + (["--pressure-source", source] if source else []))
        cfg = lifecycle.up_config(args)
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


# A python the tools' shell scripts start: the interpreter variables they use, python3 by
# name, or a venv's python or pip.
PYTHON_COMMAND = re.compile(r'"\$\{?(py|python)\}?"|(?<![\w/.-])python3(?![\w.-])|/bin/(python|pip)[\w.]*"?')


def python_without_isolation(script: str) -> list[str]:
    """The lines of a shell script that start a python that may import from the caller's
    directory: every python must be given -I, except one run after the script has
    changed to the checkout (`cd "$top"`), where the directory is the project's own."""
    offenders = []
    in_checkout = False
    with open(script) as f:
        for n, line in enumerate(f, 1):
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            if re.fullmatch(r'\s*cd "\$top"\s*', code):
                in_checkout = True
            for match in PYTHON_COMMAND.finditer(code):
                if code[:match.start()].endswith(("=", ":-")):
                    continue  # a name given to a variable (py=${PYTHON:-python3}), not a run
                if not code[match.end():].lstrip().startswith("-I") and not in_checkout:
                    offenders.append(f"{os.path.basename(script)}:{n}: {line.strip()}")
    return offenders


def test_the_tools_run_no_python_from_the_callers_directory() -> None:
    """tools/*.sh run as root from wherever they are started: a venv.py (or ensurepip.py,
    pip.py, ...) in that directory must never run.  The review found bootstrap.sh's
    `"$py" -c 'import ensurepip, venv'` and `-m venv` doing just that."""
    tools = os.path.join(TOP, "tools")
    offenders = []
    for name in sorted(os.listdir(tools)):
        if name.endswith(".sh"):
            offenders += python_without_isolation(os.path.join(tools, name))
    assert not offenders, offenders


def test_the_tools_check_sees_a_python_run_in_the_callers_directory(tmp_path) -> None:
    """The check itself: each form of python start is caught without -I, and passes with it
    or after `cd "$top"`."""
    script = tmp_path / "t.sh"
    script.write_text('py=${PYTHON:-python3}\n"$py" -c "import venv"\n"$py" -I -m venv x\n'
                      'python3 -m venv y  # a comment: python3 -m venv\n"$venv/bin/python" -m pip install\n'
                      '"$home/venv/bin/pip" install z\ncd "$top"\nexec "$python" -m pytest\n')
    assert [line.split(":")[1] for line in python_without_isolation(str(script))] == ["2", "4", "5", "6"]


# -- 9: one mount point, one bring-up at a time ----------------------------------------------------


def test_one_mount_point_is_locked_whatever_it_is_called(tmp_path) -> None:
    locks = str(tmp_path / "locks")
    (tmp_path / "parent").mkdir()
    os.symlink(tmp_path / "parent", tmp_path / "link")
    mnt = str(tmp_path / "parent" / "mnt")
    with MountLock(mnt, locks) as held:
        assert held.mountpoint == mnt
        assert os.stat(locks).st_mode & 0o777 == 0o700 and os.stat(held.path).st_mode & 0o777 == 0o600
        for other_name in (mnt + "/", str(tmp_path / "parent" / ".." / "parent" / "mnt"),
                           str(tmp_path / "link" / "mnt")):
            with pytest.raises(Busy, match=f"another vswapctl is bringing a device up at {mnt} "):
                with MountLock(other_name, locks):
                    pass
        with MountLock(str(tmp_path / "parent" / "other"), locks):  # another mount point: its own lock
            pass
    with MountLock(str(tmp_path / "link" / "mnt"), locks):  # released, then taken again
        pass


def test_the_mount_lock_is_held_by_a_process_until_it_ends(tmp_path) -> None:
    """Another process holds it (flock: dies with its holder, never left stale)."""
    locks, mnt = str(tmp_path / "locks"), str(tmp_path / "mnt")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from vswapctl.state import MountLock\n"
                               f"with MountLock({mnt!r}, {locks!r}):\n print('held', flush=True); sys.stdin.read()"],
                              cwd=TOP, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(Busy, match="another vswapctl"):
            with MountLock(mnt, locks):
                pass
    finally:
        holder.kill()
        holder.wait()
    with MountLock(mnt, locks):
        pass


def test_an_unsafe_lock_directory_or_lock_file_is_refused(tmp_path) -> None:
    locks, mnt = tmp_path / "locks", str(tmp_path / "mnt")
    locks.mkdir(mode=0o700)
    os.chmod(locks, 0o770)
    with pytest.raises(Busy, match="lock directory .* is writable by others"):
        with MountLock(mnt, str(locks)):
            pass
    os.chmod(locks, 0o700)
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.symlink(victim, locks / state.mount_lock_name(mnt))
    with pytest.raises(Busy, match="cannot lock"):
        with MountLock(mnt, str(locks)):
            pass
    assert victim.read_text() == "untouched"


@pytest.mark.skipif(os.geteuid() != 0, reason="up refuses non-root before it takes the mount point's lock")
def test_up_checks_the_mount_point_only_while_holding_its_lock(tmp_path, monkeypatch) -> None:
    """Preflight (is anything mounted there?) and every step after it run under the lock, so a
    second up on the mount point cannot pass the same check meanwhile.  Nothing real happens
    here: preflight is a stand-in that stops the bring-up."""
    monkeypatch.setattr(state, "MOUNT_LOCK_DIR", str(tmp_path / "locks"))
    mnt = str(tmp_path / "mnt")
    calls: list[str] = []

    def preflight(state_dir: str, cfg: device.UpConfig) -> list[str]:
        try:
            with MountLock(mnt):
                calls.append("unlocked")
        except Busy:
            calls.append("locked")
        return ["stopped by the test"]

    def must_not_run(*args: object) -> None:
        raise AssertionError("up went past preflight")

    monkeypatch.setattr(device, "preflight", preflight)
    monkeypatch.setattr(device, "_make_places", must_not_run)
    cfg = device.UpConfig(size=1 << 20, backing=str(tmp_path / "backing"), mountpoint=mnt, capacity=1 << 20)
    with pytest.raises(device.UpFailed, match="stopped by the test"):
        device.bring_up(str(tmp_path / "a"), cfg, lambda message: None)
    assert calls == ["locked"]
    with MountLock(mnt):  # another up (another state directory) is on this mount point
        with pytest.raises(Busy, match=f"another vswapctl is bringing a device up at {mnt}"):
            device.bring_up(str(tmp_path / "b"), cfg, lambda message: None)
    assert calls == ["locked"] and State.load(str(tmp_path / "b")) is None


def test_up_refuses_a_user_other_than_root_before_taking_the_mount_points_lock(tmp_path, monkeypatch) -> None:
    """Only root can take the lock (in /run/vswapfs): anyone else is told up needs root,
    not that a lock file could not be made."""
    monkeypatch.setattr(state, "MOUNT_LOCK_DIR", str(tmp_path / "locks"))
    state_dir = tmp_path / "st"
    state_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:  # play a user: the state directory is theirs, as their own up would make it
        os.chown(state_dir, 65534, -1)
        monkeypatch.setattr(os, "geteuid", lambda: 65534)
    cfg = device.UpConfig(size=1 << 20, backing=str(tmp_path / "backing"), mountpoint=str(tmp_path / "mnt"),
                          capacity=1 << 20)
    with pytest.raises(device.UpFailed, match="up needs root"):
        device.bring_up(str(state_dir), cfg, lambda message: None)
    assert not (tmp_path / "locks").exists()


# -- 9: the mount losetup will use is our vswapfs's ------------------------------------------------


def _dev(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def _mountinfo(tmp_path, *mounts: tuple[str, str]) -> str:
    """A mountinfo file listing (device, mount point) pairs, in mountinfo's own escaping."""
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{40 + i} 1 {dev} / {mnt.replace(' ', chr(92) + '040')} rw,relatime shared:1 - "
                            f"fuse.vswapfs vswapfs rw,user_id=0,group_id=0\n" for i, (dev, mnt) in enumerate(mounts)))
    return str(path)


@pytest.fixture
def served(tmp_path) -> str:
    """A "mount point" holding the stats file of a vswapfs with pid 4242."""
    mnt = tmp_path / "my mnt"
    mnt.mkdir()
    (mnt / "stats").write_text('{"pid": 4242, "pages_host": 0}\n')
    return str(mnt)


def test_own_mount_is_the_one_mount_there_served_by_our_vswapfs(served: str, tmp_path) -> None:
    dev = _dev(served)
    assert device.own_mount(served, 4242, _mountinfo(tmp_path, ("8:1", "/"), (dev, served))) == dev


@pytest.mark.parametrize("case,needle", [
    ("another vswapfs answers", "not the one our vswapfs (pid 4243) serves"),
    ("a stacked mount", "2 file systems are mounted at"),
    ("nothing mounted", "0 file systems are mounted at"),
    ("another device", "the mount is 0:999"),
])
def test_up_refuses_a_mount_that_is_not_its_own(case: str, needle: str, served: str, tmp_path) -> None:
    dev = _dev(served)
    pid, mounts = {
        "another vswapfs answers": (4243, [(dev, served)]),
        "a stacked mount": (4242, [(dev, served), ("0:77", served)]),
        "nothing mounted": (4242, [("8:1", "/")]),
        "another device": (4242, [("0:999", served)]),
    }[case]
    with pytest.raises(device.UpFailed) as failed:
        device.own_mount(served, pid, _mountinfo(tmp_path, *mounts))
    assert needle in str(failed.value)


def test_a_mount_that_does_not_answer_is_refused_in_bounded_time(tmp_path, monkeypatch) -> None:
    """Its stats file never opens (a FIFO with no writer stands in for a FUSE file system
    that does not answer): up gives up after OWN_MOUNT_TIMEOUT instead of hanging."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fifo = str(mnt / "stats")
    os.mkfifo(fifo)
    monkeypatch.setattr(device, "OWN_MOUNT_TIMEOUT", 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(device.UpFailed, match="did not answer"):
            device.own_mount(str(mnt), 4242, _mountinfo(tmp_path, (_dev(str(mnt)), str(mnt))))
        assert time.monotonic() - started < 5
    finally:  # let the reader go
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    deadline = time.monotonic() + 5
    while any(t.name == "read-through-mount" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "read-through-mount" for t in threading.enumerate())

