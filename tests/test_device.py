"""vswapctl's operations around a device: locks, identities, refusing before
changing anything, undoing exactly what was done, never hanging.

Most of these mount a vswapfs (``up --no-swap``) but never turn swap on; the
failing-swapoff test, which needs live swap, is in test_swap.py.
"""

from __future__ import annotations

import json
import os
import signal
import stat
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
def test_two_ups_racing_for_one_mountpoint_make_one_device(disk_dir: str) -> None:
    """Two state directories, one mount point, started at once: without the mount point's lock
    both passed the "not mounted" check and stacked two mounts there (and, with swap, both
    loop devices on the top one).  Exactly one comes up; the other fails and leaves nothing
    behind: no state, no backing file, no daemon, no second mount."""
    mnt = os.path.join(disk_dir, "shared-mnt")
    dirs = [os.path.join(disk_dir, f"state-{i}") for i in (0, 1)]
    backings = [os.path.join(disk_dir, f"backing-{i}") for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "vswapctl", "--state-dir", d, "up", "--no-swap", "--size", "16M",
                               "--capacity", "4M", "--backing", b, "--mountpoint", mnt],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d, b in zip(dirs, backings)]
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
        codes = [proc.returncode for proc in procs]
        assert sorted(codes) == [0, 1], results
        winner, loser = codes.index(0), codes.index(1)
        error = results[loser][1]
        assert "another vswapctl is bringing a device up at" in error or "already mounted" in error, error
        assert State.load(dirs[loser]) is None and not os.path.exists(backings[loser])
        assert "pid" not in results[loser][0]  # it started no daemon
        assert system.mount_devices(mnt) == [State.load(dirs[winner]).mount_dev]
    finally:
        for d in dirs:
            if State.load(d) is not None:
                vswapctl(d, "down")
    assert system.mount_devices(mnt) == []


@needs_root_fuse
def test_up_runs_no_code_from_the_directory_it_is_run_in(state_dir: str, disk_dir: str, tmp_path) -> None:
    """Root runs `vswapctl up` where an argparse.py and a trio.py lie: neither runs in either
    daemon (`python -m` there had put that directory first on the daemons' path); the daemons
    run in /.  vswapctl itself runs as its console script does, from its own directory."""
    from vswapctl import launch

    marker, work = tmp_path / "MARKER", tmp_path / "work"
    work.mkdir()
    for name in ("argparse", "trio"):
        (work / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ran\\n')\n")
    done = subprocess.run(launch.module_argv("vswapctl", "--state-dir", state_dir, "up", "--no-swap", "--size", "16M",
                                             "--capacity", "4M", "--backing", os.path.join(disk_dir, "backing")),
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    for ident in (state.vswapfs_id, state.hoststore_id):
        assert os.readlink(f"/proc/{ident.pid}/cwd") == "/"
    assert not marker.exists(), marker.read_text()
    assert vswapctl(state_dir, "down").returncode == 0
    assert not marker.exists(), marker.read_text()


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

    was_mounted = fusectl.is_mounted()
    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    with open(f"/proc/{state.vswapfs_id.pid}/mountinfo") as f:
        connection = next(int(line.split()[2].split(":")[1]) for line in f if line.split()[4] == state.mountpoint)
    assert fusectl.read_limit(connection, "max_background") == 256
    assert fusectl.read_limit(connection, "congestion_threshold") == 192
    assert fusectl.is_mounted() == was_mounted  # fusectl is left as vswapfs found it


@needs_root_fuse
def test_up_fails_at_once_when_its_daemon_exits(state_dir: str, disk_dir: str) -> None:
    start = time.monotonic()
    done = up_no_swap(state_dir, disk_dir, "--pressure-source", "bogus")  # the store refuses it and exits
    assert done.returncode == 1 and time.monotonic() - start < 10  # not the 20 s readiness timeout
    assert "hoststore exited with status 2 during start-up" in done.stderr and "pressure source" in done.stderr
    assert State.load(state_dir) is None and not os.path.exists(os.path.join(disk_dir, "backing"))


# -- review findings: the rule holds when steps fail ---------------------------------------


def fake_command(tmp_path, name: str, script: str) -> dict[str, str]:
    """An environment whose PATH finds a stand-in for ``name`` first."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / name).write_text("#!/bin/sh\n" + script)
    (fake / name).chmod(0o755)
    return dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")


@needs_root_fuse
def test_a_failed_unmount_stops_down_and_vswapfs_is_never_killed(state_dir: str, disk_dir: str, tmp_path) -> None:
    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    env = fake_command(tmp_path, "umount", "echo \"umount: $1: target is busy.\" >&2\nexit 32\n")
    done = vswapctl(state_dir, "down", env=env)
    assert done.returncode == 1 and "target is busy" in done.stdout and "Nothing more was" in done.stdout
    assert state.vswapfs_id.alive() and state.hoststore_id.alive()
    assert system.mount_type(state.mountpoint) == "fuse.vswapfs" and State.load(state_dir) is not None
    done = vswapctl(state_dir, "down")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_root_fuse
def test_a_failed_undo_step_stops_the_undo_and_keeps_the_state(state_dir: str, disk_dir: str, tmp_path) -> None:
    """swapon fails, and then so does the unmount of the undo: up stops undoing (the
    store still serves the mounted vswapfs), keeps its state, and down finishes later.
    The failing umount first on PATH must not keep vswapfs from unmounting fusectl."""
    from vswapfs import fusectl

    was_mounted = fusectl.is_mounted()
    env = fake_command(tmp_path, "swapon", "exit 1\n")
    fake_command(tmp_path, "umount", "echo \"umount: $1: target is busy.\" >&2\nexit 32\n")
    done = vswapctl(state_dir, "up", "--size", "16M", "--capacity", "4M", "--backing",
                    os.path.join(disk_dir, "backing"), env=env)
    assert done.returncode == 1 and "undoing stopped" in done.stderr, done.stdout + done.stderr
    state = State.load(state_dir)
    assert state is not None and state.vswapfs_id.alive() and state.hoststore_id.alive()
    assert system.mount_type(state.mountpoint) == "fuse.vswapfs"
    assert os.path.exists(os.path.join(disk_dir, "backing"))  # a live vswapfs holds it: not removed
    done = vswapctl(state_dir, "down")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not os.path.exists(os.path.join(disk_dir, "backing"))
    assert fusectl.is_mounted() == was_mounted


@needs_root_fuse
def test_status_and_down_never_stat_the_mount(state_dir: str, disk_dir: str) -> None:
    import shutil

    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    done = up_no_swap(state_dir, disk_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    state = State.load(state_dir)
    trace = os.path.join(disk_dir, "trace")
    for command in (["status"], ["stats"]):
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file", "-o", trace, sys.executable, "-m", "vswapctl",
                        "--state-dir", state_dir, *command], capture_output=True, timeout=60, check=True)
        with open(trace) as f:
            touching = [line for line in f if f'"{state.mountpoint}' in line]
        assert touching == [], f"{command} touched the mount: {touching[:3]}"


@needs_root_fuse
def test_a_symlinked_mountpoint_is_refused_and_paths_are_recorded_resolved(state_dir: str, disk_dir: str) -> None:
    real = os.path.join(disk_dir, "real")
    os.mkdir(real)
    os.symlink(real, os.path.join(disk_dir, "alias"))
    done = up_no_swap(state_dir, disk_dir, "--mountpoint", os.path.join(disk_dir, "alias"))
    assert done.returncode == 1 and "symlink" in done.stderr
    os.mkdir(os.path.join(real, "mnt"))
    done = up_no_swap(state_dir, disk_dir, "--mountpoint", os.path.join(disk_dir, "alias", "mnt"))
    assert done.returncode == 0, done.stderr
    assert State.load(state_dir).mountpoint == os.path.join(os.path.realpath(real), "mnt")
    os.unlink(os.path.join(disk_dir, "alias"))
    os.symlink("/nonexistent", os.path.join(disk_dir, "alias"))  # re-pointed after up: down is not fooled
    done = vswapctl(state_dir, "down")
    assert done.returncode == 0 and "unmounted" in done.stdout, done.stdout + done.stderr


@needs_root_fuse
def test_up_with_the_default_backing_file_on_a_fresh_machine(state_dir: str, disk_dir: str) -> None:
    from vswapctl.state import BACKING_ROOT, default_backing

    backing = default_backing(state_dir)
    root_existed = os.path.isdir(BACKING_ROOT)
    done = vswapctl(state_dir, "up", "--no-swap", "--size", "16M", "--capacity", "4M")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.path.getsize(backing) == 16 << 20 and os.stat(backing).st_blocks * 512 >= 16 << 20
    done = vswapctl(state_dir, "down")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not os.path.exists(os.path.dirname(backing))  # every directory up made is gone
    assert os.path.isdir(BACKING_ROOT) == root_existed


@needs_root_fuse
def test_the_daemons_leave_the_memory_cgroup_of_whoever_ran_up(state_dir: str, disk_dir: str) -> None:
    from vswapctl import cgroup

    try:
        cg = cgroup.create(f"vswapctl-test-{os.getpid()}", 256 << 20)
    except cgroup.CgroupUnavailable as exc:
        pytest.skip(str(exc))
    try:
        done = cg.run([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "up", "--no-swap",
                       "--size", "16M", "--capacity", "4M", "--backing", os.path.join(disk_dir, "backing")],
                      timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        state = State.load(state_dir)
        for ident in (state.vswapfs_id, state.hoststore_id):
            with open(f"/proc/{ident.pid}/cgroup") as f:
                memory = [line.strip() for line in f if ":memory:" in line or line.startswith("0::")]
            assert memory and all(line.endswith(":/") for line in memory), memory
    finally:
        if State.load(state_dir) is not None:
            vswapctl(state_dir, "down")
        cg.remove()


@needs_root_fuse
def test_sigterm_to_up_midway_undoes_what_it_did(state_dir: str, disk_dir: str, tmp_path) -> None:
    reached = tmp_path / "losetup-reached"
    # up stops here, its daemons started: in the stand-in for losetup, which says it was reached
    env = fake_command(tmp_path, "losetup", f"touch {reached}\nsleep 30\n")
    proc = subprocess.Popen([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "up", "--size", "16M",
                             "--capacity", "4M", "--backing", os.path.join(disk_dir, "backing")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not reached.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted" in err, out + err
    assert State.load(state_dir) is None and not os.path.exists(os.path.join(disk_dir, "backing"))
    assert system.mounts_under(disk_dir) == []


def test_a_process_of_another_boot_is_never_ours() -> None:
    ident = ProcessId.of(os.getpid())
    assert ident.alive()
    assert not ProcessId(ident.pid, ident.start, "another-boot").alive()


def test_a_command_that_overruns_its_timeout_is_stopped() -> None:
    start = time.monotonic()
    with pytest.raises(system.CommandFailed, match="did not finish"):
        system.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - start < 5


@needs_root_fuse
def test_up_makes_a_readable_state_directory_private_for_the_stores_socket(state_dir: str, disk_dir: str) -> None:
    """The store refuses a socket directory others can enter; a state directory made
    0755 by hand (ours, not writable by others) is made private rather than failing."""
    os.makedirs(state_dir, mode=0o755)
    os.chmod(state_dir, 0o755)
    done = vswapctl(state_dir, "up", "--no-swap", "--size", "16M", "--capacity", "4M",
                    "--backing", os.path.join(disk_dir, "backing"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "made" in done.stdout and stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert vswapctl(state_dir, "down").returncode == 0


@needs_root_fuse
def test_a_block_device_is_a_backing_up_uses_whole_and_down_leaves_in_place(state_dir: str, disk_dir: str) -> None:
    """The RFC's backing_swap: a disk of its own (a loop device over a file stands in for
    one).  up takes its size, status says it is configured for machine-wide pressure as far
    as the backing goes, pages written through the mount land on it, and down leaves it be."""
    image = os.path.join(disk_dir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        done = vswapctl(state_dir, "up", "--no-swap", "--capacity", "4K", "--backing", dev)
        assert done.returncode == 0, done.stdout + done.stderr
        state = State.load(state_dir)
        assert state is not None and state.size == 16 << 20 and not state.created_backing
        status = json.loads(vswapctl(state_dir, "status", "--json").stdout)
        assert not any("backing" in risk for risk in status["pressure_risks"]), status["pressure_risks"]
        page = os.urandom(4096)
        fd = os.open(state.swapfile, os.O_RDWR)
        try:
            os.pwrite(fd, page * 4, 0)  # the store holds one page at most: the rest go to the device
            assert os.pread(fd, 4 * 4096, 0) == page * 4
        finally:
            os.close(fd)
        done = vswapctl(state_dir, "down")
        assert done.returncode == 0, done.stdout + done.stderr
        with open(image, "rb") as f:
            assert page in f.read(4 * 4096)  # refused pages went to the device
        assert os.path.exists(dev) and State.load(state_dir) is None
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@needs_root_fuse
def test_up_refuses_a_block_device_with_a_filesystem_on_it(state_dir: str, disk_dir: str) -> None:
    image = os.path.join(disk_dir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        done = vswapctl(state_dir, "up", "--no-swap", "--backing", dev)
        assert done.returncode == 1 and "holds an ext2/3/4 filesystem" in done.stderr, done.stderr
        assert State.load(state_dir) is None and "hoststore pid" not in done.stdout  # refused before anything
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
