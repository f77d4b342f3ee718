"""A mounted vswapfs: O_DIRECT I/O through the kernel, against real daemons."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pagewire.protocol import PAGE_SIZE

from .conftest import fuse_unavailable
from .daemons import Daemons, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))]

NPAGES = 4096  # 16 MiB device
CAPACITY_PAGES = 1024  # 4 MiB store: host and backing both get pages


@pytest.fixture
def daemons(disk_dir: str):
    d = Daemons(disk_dir, capacity=f"{CAPACITY_PAGES * 4}K", size=f"{NPAGES * 4}K")
    try:
        yield d.start()
    finally:
        d.stop()


def pattern(page: int, version: int) -> bytes:
    """Not same-filled (its last word differs): it must travel to the store."""
    return (page.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8 - 1) + b"not same"


def test_random_o_direct_pages_read_back_and_counters_add_up(daemons: Daemons) -> None:
    rng = random.Random(42)
    truth: dict[int, int] = {}
    buf = mmap.mmap(-1, 64 * PAGE_SIZE)  # page-aligned, as O_DIRECT needs
    fd = os.open(daemons.swapfile, os.O_RDWR | os.O_DIRECT)
    written = 0
    try:
        for version in range(1, 3001):
            first = rng.randrange(NPAGES)
            n = rng.randint(1, min(64, NPAGES - first))
            buf[: n * PAGE_SIZE] = b"".join(pattern(first + i, version) for i in range(n))
            assert os.pwrite(fd, memoryview(buf)[: n * PAGE_SIZE], first * PAGE_SIZE) == n * PAGE_SIZE
            truth.update({first + i: version for i in range(n)})
            written += n
        bad = 0
        for first in range(0, NPAGES, 64):
            assert os.preadv(fd, [buf], first * PAGE_SIZE) == 64 * PAGE_SIZE
            for i in range(64):
                p = first + i
                expected = pattern(p, truth[p]) if p in truth else bytes(PAGE_SIZE)
                bad += buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] != expected
        assert bad == 0
    finally:
        os.close(fd)
    fs, host = daemons.stats(), daemons.host_stats()
    assert fs["host_writes"] + fs["backing_writes"] == written
    assert fs["host_writes"] == host["accepted"] and fs["host_writes"] > 0 and fs["backing_writes"] > 0
    assert fs["refused_capacity"] == host["refused_capacity"] > 0
    assert fs["pages_host"] == host["pages_stored"] <= CAPACITY_PAGES
    assert fs["pages_host"] + fs["pages_backing"] == len(truth)
    assert fs["io_errors"] == 0 and host["misses"] == 0
    # Pages in the store were read from the memory it shares with vswapfs, the rest asked for.
    assert fs["shared_memory"] and fs["shared_reads"] > 0
    assert host["reads"] == fs["host_reads"] - fs["shared_reads"]


def test_requests_are_read_without_splice(daemons: Daemons) -> None:
    """libfuse reads requests with splice(2) unless told not to, and for each the kernel
    allocates: in a guest short of memory vswapfs sat in that allocation's reclaim for
    minutes while the swap writes it was to serve waited (docs/pressure.md, cycle 4).
    The mounted vswapfs negotiated plain reads (patches/pyfuse3-*-splice.patch), and
    serves pages all the same."""
    fd = os.open(daemons.swapfile, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(3, 1), 3 * PAGE_SIZE)
        assert os.pread(fd, PAGE_SIZE, 3 * PAGE_SIZE) == pattern(3, 1)
    finally:
        os.close(fd)
    stats = daemons.stats()
    assert stats["fuse_splice_read"] is False and not any("splice" in r for r in stats["pressure_risks"])


def test_unaligned_io_is_einval_and_statfs_works(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDWR)
    try:
        for offset, data in ((1, b"x" * PAGE_SIZE), (0, b"x" * 100), (NPAGES * PAGE_SIZE, b"x" * PAGE_SIZE)):
            with pytest.raises(OSError) as info:
                os.pwrite(fd, data, offset)
            assert info.value.errno in (errno.EINVAL, errno.EFBIG)
    finally:
        os.close(fd)
    st = os.statvfs(daemons.mountpoint)
    assert st.f_blocks * st.f_frsize == NPAGES * PAGE_SIZE
    assert os.stat(daemons.swapfile).st_size == NPAGES * PAGE_SIZE
    assert oct(os.stat(daemons.backing).st_mode & 0o777) == "0o600"
    assert os.stat(daemons.backing).st_blocks * 512 >= NPAGES * PAGE_SIZE  # preallocated


def test_writes_fall_back_while_the_store_is_down_and_it_reconnects(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, PAGE_SIZE)
    try:
        buf[:] = pattern(1, 1)
        os.pwrite(fd, buf, PAGE_SIZE)
        daemons.stop_hoststore()  # SIGTERM: the store drains first
        wait_for(lambda: not daemons.stats()["host_connected"], 10, "vswapfs noticing the store is gone")
        start = time.monotonic()
        for p in range(10, 20):
            buf[:] = pattern(p, 2)
            os.pwrite(fd, buf, p * PAGE_SIZE)
        assert time.monotonic() - start < 5
        assert daemons.stats()["fallback_unreachable"] == 10
        daemons.start_hoststore()
        daemons.wait_host_connected()
        for p in range(10, 20):
            os.preadv(fd, [buf], p * PAGE_SIZE)
            assert buf[:] == pattern(p, 2)
        # Page 1 was in the store, which was stopped with SIGTERM: it drained, handing page 1 back.
        os.preadv(fd, [buf], PAGE_SIZE)
        assert buf[:] == pattern(1, 1)
        stats = daemons.stats()
        assert stats["link_connects"] == 2 and stats["link_host_restarts"] == 1
        assert stats["handback_taken"] == 1 and stats["pages_lost"] == 0 and stats["read_failures"] == 0
    finally:
        os.close(fd)


def test_sigterm_is_ignored_while_the_swap_file_is_open(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDONLY)
    try:
        daemons.vswapfs.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM ignored" in daemons.read_log("vswapfs"), 10, "vswapfs refusing SIGTERM")
        assert daemons.vswapfs.poll() is None
        assert os.pread(fd, PAGE_SIZE, 0) == bytes(PAGE_SIZE)
    finally:
        os.close(fd)
    # The kernel tells vswapfs of the close (RELEASE) on its own time: a SIGTERM before
    # that is rightly ignored too.
    wait_for(lambda: daemons.stats()["swap_opens"] == 0, 10, "vswapfs seeing the file closed")
    daemons.vswapfs.send_signal(signal.SIGTERM)
    assert daemons.vswapfs.wait(10) == 0
    assert not os.path.ismount(daemons.mountpoint)


def test_clean_unmount_releases_the_pages_in_the_store(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDWR)
    os.pwrite(fd, pattern(0, 1) * 8, 0)
    os.close(fd)
    assert daemons.host_stats()["pages_stored"] == 8
    subprocess.run(["umount", daemons.mountpoint], check=True)
    assert daemons.vswapfs.wait(10) == 0
    assert daemons.host_stats()["pages_stored"] == 0


@pytest.mark.parametrize("where", ["/dev/shm", "inside"])
def test_backing_on_tmpfs_or_inside_the_mount_is_refused(disk_dir: str, where: str) -> None:
    mnt = os.path.join(disk_dir, "mnt")
    os.mkdir(mnt)
    if where == "/dev/shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        backing = f"/dev/shm/vswapfs-test-{os.getpid()}"
    else:
        backing = os.path.join(mnt, "backing")
    done = subprocess.run([sys.executable, "-m", "vswapfs", mnt, "--backing", backing, "--size", "1M",
                           "--host", "unix:/nonexistent"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert not os.path.exists(backing)
    assert ("tmpfs" if where == "/dev/shm" else "inside the vswapfs mount") in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_second_vswapfs_on_the_same_backing_file_is_refused(daemons: Daemons, disk_dir: str) -> None:
    other = os.path.join(disk_dir, "other-mnt")
    os.mkdir(other)
    done = subprocess.run([sys.executable, "-m", "vswapfs", other, "--backing", daemons.backing,
                           "--host", f"unix:{daemons.socket}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "in use by another vswapfs" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.ismount(other)


def test_reads_at_and_past_the_end_are_short(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(NPAGES - 1, 1), (NPAGES - 1) * PAGE_SIZE)
        assert os.pread(fd, 4 * PAGE_SIZE, (NPAGES - 1) * PAGE_SIZE) == pattern(NPAGES - 1, 1)
        assert os.pread(fd, PAGE_SIZE, NPAGES * PAGE_SIZE) == b""
        assert os.pread(fd, PAGE_SIZE, (NPAGES + 10) * PAGE_SIZE) == b""
    finally:
        os.close(fd)
    assert "Traceback" not in daemons.read_log("vswapfs")


def vswapfs_once(mnt: str, backing: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start vswapfs expecting it to refuse (it exits at once, with one line)."""
    return subprocess.run([sys.executable, "-m", "vswapfs", mnt, "--backing", backing, "--size", "1M",
                           "--host", "unix:/nonexistent", *extra], capture_output=True, text=True, timeout=30)


def test_an_existing_sparse_backing_file_is_allocated_in_full(disk_dir: str) -> None:
    backing = os.path.join(disk_dir, "sparse")
    with open(backing, "wb") as f:
        f.truncate(NPAGES * PAGE_SIZE)  # all holes: a refused page could meet ENOSPC
    os.chmod(backing, 0o600)  # others must not read swapped pages (a 0644 file is refused)
    assert os.stat(backing).st_blocks == 0
    d = Daemons(disk_dir, capacity="1M", size=f"{NPAGES * 4}K", backing_path=backing)
    try:
        d.start()
        assert os.stat(backing).st_blocks * 512 >= NPAGES * PAGE_SIZE
    finally:
        d.stop()


def test_a_symlinked_backing_file_is_refused(disk_dir: str) -> None:
    mnt = os.path.join(disk_dir, "mnt")
    os.mkdir(mnt)
    real = os.path.join(disk_dir, "real")
    with open(real, "wb") as f:
        f.truncate(1 << 20)
    os.symlink(real, os.path.join(disk_dir, "link"))
    done = vswapfs_once(mnt, os.path.join(disk_dir, "link"))
    assert done.returncode == 1 and "symlink" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting an overlay needs root")
def test_a_backing_file_on_overlayfs_is_refused_unless_allowed(disk_dir: str) -> None:
    dirs = {name: os.path.join(disk_dir, name) for name in ("lower", "upper", "work", "merged", "mnt")}
    for path in dirs.values():
        os.mkdir(path)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}", dirs["merged"]],
                   check=True)
    try:
        backing = os.path.join(dirs["merged"], "backing")
        done = vswapfs_once(dirs["mnt"], backing)
        assert done.returncode == 1 and "overlay" in done.stderr and "--allow-backing-fs" in done.stderr
        assert not os.path.exists(backing)
        proc = subprocess.Popen([sys.executable, "-m", "vswapfs", dirs["mnt"], "--backing", backing, "--size", "1M",
                                 "--host", "unix:/nonexistent", "--allow-backing-fs", "overlay"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.ismount(dirs["mnt"]), 15, "vswapfs on an allowed overlay")
        finally:
            proc.send_signal(signal.SIGTERM)  # nothing has the swap file open: it unmounts and exits
            assert proc.wait(15) == 0
    finally:
        subprocess.run(["umount", dirs["merged"]], check=True)


def test_vswapfs_over_loopback_tcp_without_a_token_when_both_sides_are_told(disk_dir: str) -> None:
    """--insecure-tcp on both daemons: the pages go over loopback TCP (no shared memory
    there) and read back.  (Refusal without it: tests/test_access.py and test_cli.py.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tcp = f"tcp:127.0.0.1:{port}"
    d = Daemons(disk_dir, capacity=f"{CAPACITY_PAGES * 4}K", size=f"{NPAGES * 4}K",
                extra_hoststore=["--listen", tcp, "--insecure-tcp"], extra_vswapfs=["--host", tcp, "--insecure-tcp"])
    try:
        d.start()
        d.wait_host_connected()
        buf = mmap.mmap(-1, 64 * PAGE_SIZE)
        fd = os.open(d.swapfile, os.O_RDWR | os.O_DIRECT)
        try:
            buf[:] = b"".join(pattern(i, 1) for i in range(64))
            assert os.pwrite(fd, buf, 0) == 64 * PAGE_SIZE
            buf[:] = bytes(64 * PAGE_SIZE)
            assert os.preadv(fd, [buf], 0) == 64 * PAGE_SIZE
            assert buf[:] == b"".join(pattern(i, 1) for i in range(64))
        finally:
            os.close(fd)
        fs, host = d.stats(), d.host_stats()
        assert fs["host_address"] == tcp and not fs["shared_memory"]
        assert fs["host_writes"] == host["accepted"] == 64 and host["reads"] == 64
        assert host["clients"][next(iter(host["clients"]))]["pages"] == 64
    finally:
        d.stop()
