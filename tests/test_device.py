"""vswapctl's operations around a device: locks, identities, refusing before
changing anything, undoing exactly what was done, never hanging.

Most of these mount a vswapfs (``up --no-swap``) but never turn swap on; the
failing-swapoff test, which needs live swap, is in test_swap.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vswapctl import system
from vswapctl.procs import ProcessId
from vswapctl.state import State, StateLock

from .conftest import fuse_unavailable


def vswapctl(state_dir: str, *args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


needs_root_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or fuse_unavailable() is not None,
    reason="needs root and FUSE (mounts a vswapfs)" if os.geteuid() != 0 else str(fuse_unavailable()),
)


# -- without root ---------------------------------------------------------------------------


def test_down_never_signals_a_process_that_is_not_the_one_up_started(tmp_path) -> None:
    """The saved pids now belong to another process (a reused pid): down leaves it alone."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        me = ProcessId.of(other.pid)
        impostor = {"pid": other.pid, "start": me.start + 12345}  # same pid, another process
        state = State(str(tmp_path), mountpoint=str(tmp_path / "mnt"), backing=str(tmp_path / "backing"),
                      host=f"unix:{tmp_path}/host.sock", hoststore=impostor, vswapfs=impostor)
        state.save()
        done = vswapctl(str(tmp_path), "down")
        assert done.returncode == 0, done.stdout + done.stderr
        assert other.poll() is None, "down signalled a process it did not start"
        assert "not running" in done.stdout
        assert State.load(str(tmp_path)) is None
    finally:
        other.kill()
        other.wait()


def test_a_second_vswapctl_on_the_same_state_directory_is_refused(tmp_path) -> None:
    with StateLock(str(tmp_path)):
        for command in (["up", "--size", "16M"], ["down"]):
            done = vswapctl(str(tmp_path), *command)
            assert done.returncode == 1 and "another vswapctl is working on" in done.stderr, done.stderr
    assert State.load(str(tmp_path)) is None


def test_process_identity_survives_only_for_the_same_process() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    ident = ProcessId.of(proc.pid)
    assert ident is not None and ident.alive()
    assert not ProcessId(proc.pid, ident.start + 1).alive()
    assert not ProcessId(proc.pid, ident.start + 1).signal(signal.SIGTERM)  # refused: not that process
    assert proc.poll() is None
    assert ident.signal(signal.SIGTERM)
    assert ident.wait_gone(5) and not ident.signal(signal.SIGTERM)


# -- as root, a mounted file without swap -----------------------------------------------------


@pytest.fixture
def state_dir(disk_dir: str):
    path = os.path.join(disk_dir, "state")
    try:
        yield path
    finally:
        if State.load(path) is not None:
            vswapctl(path, "down", timeout=600)


def up_no_swap(state_dir: str, disk_dir: str, *extra: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return vswapctl(state_dir, "up", "--no-swap", "--size", "16M", "--capacity", "4M",
                    "--backing", os.path.join(disk_dir, "backing"), *extra, env=env)


@needs_root_fuse
def test_up_refuses_a_mounted_or_busy_mountpoint_before_changing_anything(state_dir: str, disk_dir: str) -> None:
    mnt = os.path.join(disk_dir, "taken")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "vswapfs-test", mnt], check=True)
    try:
        done = up_no_swap(state_dir, disk_dir, "--mountpoint", mnt)
        assert done.returncode == 1 and "already mounted" in done.stderr, done.stderr
        assert system.mount_type(mnt) == "tmpfs"  # left exactly as it was
    finally:
        subprocess.run(["umount", mnt], check=True)
    with open(os.path.join(mnt, "somebody's"), "w") as f:
        f.write("file")
    done = up_no_swap(state_dir, disk_dir, "--mountpoint", mnt)
    assert done.returncode == 1 and "not empty" in done.stderr, done.stderr
    assert State.load(state_dir) is None and not os.path.exists(os.path.join(disk_dir, "backing"))
    assert "hoststore pid" not in done.stdout  # nothing was started


@needs_root_fuse
def test_a_failed_up_undoes_exactly_what_it_did(state_dir: str, disk_dir: str, tmp_path) -> None:
    """swapon fails (a failing swapon first on PATH): everything up did is undone, in
    reverse order; what was there before (the mountpoint directory) stays."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "swapon").write_text("#!/bin/sh\necho 'swapon: failing on purpose' >&2\nexit 1\n")
    (fake / "swapon").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    mnt = os.path.join(disk_dir, "mine")
    os.mkdir(mnt)  # exists before: up must not remove it
    backing = os.path.join(disk_dir, "backing")
    done = vswapctl(state_dir, "up", "--size", "16M", "--capacity", "4M", "--backing", backing,
                    "--mountpoint", mnt, env=env)
    assert done.returncode == 1 and "failing on purpose" in done.stderr, done.stdout + done.stderr
    out = done.stdout
    order = [out.index(s) for s in ("undone: swapoff", "undone: detach", "undone: stop vswapfs",
                                    "undone: stop hoststore", "undone: remove " + backing)]
    assert order == sorted(order), out  # in reverse order of doing
    assert os.path.isdir(mnt) and system.mount_type(mnt) is None
    assert not os.path.exists(backing) and State.load(state_dir) is None
    assert system.loops_under(disk_dir) == []
    pids = [int(line.split()[3]) for line in out.splitlines()  # "vswapctl: hoststore pid N on ..."
            if line.split()[1:3] in (["hoststore", "pid"], ["vswapfs", "pid"]) and line.split()[3].isdigit()]
    assert len(set(pids)) == 2
    for pid in set(pids):  # the daemons it started are gone
        assert ProcessId.of(pid) is None or not ProcessId.of(pid).alive()


@needs_root_fuse
def test_a_second_up_is_refused_and_the_backing_file_is_locked(state_dir: str, disk_dir: str) -> None:
    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    again = up_no_swap(state_dir, disk_dir)
    assert again.returncode == 1 and "already up" in again.stderr
    other = vswapctl(os.path.join(disk_dir, "other-state"), "up", "--no-swap", "--size", "16M",
                     "--backing", os.path.join(disk_dir, "backing"))
    assert other.returncode == 1 and "in use by another vswapfs" in other.stderr, other.stderr


@needs_root_fuse
def test_status_answers_in_time_when_vswapfs_is_stopped(state_dir: str, disk_dir: str) -> None:
    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    assert state.vswapfs_id.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        status = vswapctl(state_dir, "status", timeout=30)
        elapsed = time.monotonic() - start
        assert status.returncode == 0 and elapsed < 10, (elapsed, status.stdout)
        assert "STOPPED" in status.stdout and "did not answer" in status.stdout
        stats = vswapctl(state_dir, "stats", "--json", timeout=30)
        assert "did not answer" in json.loads(stats.stdout)["vswapfs"]
    finally:
        state.vswapfs_id.signal(signal.SIGCONT)
    status = vswapctl(state_dir, "status", "--json")
    assert json.loads(status.stdout)["host_connected"] is True


@needs_root_fuse
def test_the_kernel_may_keep_many_swap_requests_in_flight(state_dir: str, disk_dir: str) -> None:
    from vswapfs import fusectl

    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    with open(f"/proc/{state.vswapfs_id.pid}/mountinfo") as f:
        connection = next(int(line.split()[2].split(":")[1]) for line in f if line.split()[4] == state.mountpoint)
    assert fusectl.read_limit(connection, "max_background") == 256
    assert fusectl.read_limit(connection, "congestion_threshold") == 192


@needs_root_fuse
def test_up_fails_at_once_when_its_daemon_exits(state_dir: str, disk_dir: str) -> None:
    start = time.monotonic()
    done = up_no_swap(state_dir, disk_dir, "--pressure-source", "bogus")  # the store refuses it and exits
    assert done.returncode == 1 and time.monotonic() - start < 10  # not the 20 s readiness timeout
    assert "hoststore exited with status 2 during start-up" in done.stderr and "pressure source" in done.stderr
    assert State.load(state_dir) is None and not os.path.exists(os.path.join(disk_dir, "backing"))
