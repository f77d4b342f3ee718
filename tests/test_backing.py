"""The backing file and device: who may own it, every block written before use, O_DIRECT
through bounce buffers, and block devices that hold nothing else."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator

import pytest

from pagewire.messages import PAGE_SIZE
from vswapfs import backing as backing_module
from vswapfs.backing import Backing, BackingError, _chunks, mount_options
from vswapfs.backingcheck import check_device, signature
from vswapfs.extents import FiemapUnsupported, unwritten_ranges

SIZE = 64 * PAGE_SIZE


def _make(path: str, mode: int = 0o600, size: int = SIZE) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    os.ftruncate(fd, size)
    os.close(fd)
    os.chmod(path, mode)


# -- who may own it (a page swapped there is readable by whoever can read the file) ---------


def test_an_existing_file_others_can_read_is_refused(disk_dir: str) -> None:
    path = os.path.join(disk_dir, "backing")
    _make(path, 0o666)
    with pytest.raises(BackingError, match="readable or writable by others .*0666"):
        Backing.open(path, None)
    os.chmod(path, 0o640)
    with pytest.raises(BackingError, match="readable or writable by others .*0640"):
        Backing.open(path, None)
    os.chmod(path, 0o600)
    Backing.open(path, None).close()


def test_a_file_of_another_user_is_refused(disk_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a file to another user")
    path = os.path.join(disk_dir, "backing")
    _make(path)
    os.chown(path, 65534, 65534)
    with pytest.raises(BackingError, match="belongs to uid 65534"):
        Backing.open(path, None)


def test_a_directory_others_may_write_to_is_refused_unless_sticky(disk_dir: str) -> None:
    shared = os.path.join(disk_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    path = os.path.join(shared, "backing")
    with pytest.raises(BackingError, match="writable by others .*without the sticky bit"):
        Backing.open(path, SIZE)
    assert not os.path.exists(path)  # refused before anything was made
    os.chmod(shared, 0o1777)  # like /tmp: others cannot remove or rename our file
    Backing.open(path, SIZE).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_directory_of_another_user_anywhere_on_the_way_is_refused(disk_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a directory to another user")
    theirs = os.path.join(disk_dir, "theirs")
    ours = os.path.join(theirs, "ours")
    os.makedirs(ours)
    os.chmod(theirs, 0o755)
    os.chown(theirs, 65534, 65534)  # they could rename "ours" and put a link in its place
    with pytest.raises(BackingError, match="theirs .*belongs to uid 65534"):
        Backing.open(os.path.join(ours, "backing"), SIZE)
    assert not os.listdir(ours)


# -- every block written before the first page is served ------------------------------


@pytest.mark.parametrize("how", ["sparse", "fallocated", "partly written"])
def test_a_file_is_written_in_full_where_it_was_not(disk_dir: str, how: str) -> None:
    path = os.path.join(disk_dir, "backing")
    _make(path)
    fd = os.open(path, os.O_RDWR)
    try:
        if how == "fallocated":
            os.posix_fallocate(fd, 0, SIZE)
        elif how == "partly written":
            os.pwrite(fd, b"\x55" * (4 * PAGE_SIZE), 8 * PAGE_SIZE)
            os.fsync(fd)
        try:
            assert unwritten_ranges(fd, SIZE), "the file starts with blocks to write"
        except FiemapUnsupported:
            pytest.skip("this filesystem has no FIEMAP")
    finally:
        os.close(fd)
    seen: list[tuple[int, int]] = []
    b = Backing.open(path, None, progress=lambda done, total: seen.append((done, total)))
    try:
        assert unwritten_ranges(b.fd, SIZE) == []
        assert seen and seen[-1][0] == seen[-1][1]
        if how == "partly written":  # what was written stays: only the rest was filled
            assert seen[-1][1] == SIZE - 4 * PAGE_SIZE
            assert b.read_sync(8 * PAGE_SIZE, 4 * PAGE_SIZE) == b"\x55" * (4 * PAGE_SIZE)
        assert b.direct and not any("unwritten" in risk for risk in b.pressure_risks)
    finally:
        b.close()


def test_a_filesystem_without_fiemap_gets_the_whole_file_written(disk_dir: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, size: int) -> list[tuple[int, int]]:
        raise FiemapUnsupported("no FIEMAP here")

    monkeypatch.setattr(backing_module, "unwritten_ranges", unsupported)
    seen: list[int] = []
    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE, progress=lambda done, total: seen.append(total))
    try:
        assert seen[-1] == SIZE
        assert any("FIEMAP" in risk for risk in b.pressure_risks)
    finally:
        b.close()


def test_a_file_that_cannot_be_written_in_full_is_refused_and_a_new_one_removed(
        disk_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, view: memoryview, offset: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backing_module, "_pwrite_all", no_space)
    path = os.path.join(disk_dir, "backing")
    with pytest.raises(BackingError, match="cannot write .* in full .*No space"):
        Backing.open(path, SIZE)
    assert not os.path.exists(path)


def test_the_filesystems_time_stamps_are_named_as_a_risk_without_lazytime(disk_dir: str) -> None:
    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE)
    try:
        lazy = "lazytime" in mount_options(disk_dir)
        assert any("lazytime" in risk for risk in b.pressure_risks) != lazy
    finally:
        b.close()


# -- O_DIRECT through bounce buffers ----------------------------------------------------


def test_chunks_join_neighbours_and_split_at_the_buffer_size() -> None:
    page = memoryview(bytes(PAGE_SIZE))
    parts = [(3 * PAGE_SIZE, page), (0, memoryview(bytes(2 * PAGE_SIZE))), (2 * PAGE_SIZE, page),
             (9 * PAGE_SIZE, page)]
    chunks = _chunks(parts, 2 * PAGE_SIZE)
    assert [(offset, sum(map(len, pieces))) for offset, pieces in chunks] == \
        [(0, 2 * PAGE_SIZE), (2 * PAGE_SIZE, 2 * PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE)]


def test_scattered_writes_and_long_reads_round_trip(disk_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backing_module, "BOUNCE_BYTES", 4 * PAGE_SIZE)  # so that transfers are split
    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE)
    try:
        assert b.direct
        pages = {i: bytes([i]) * PAGE_SIZE for i in (0, 1, 2, 3, 4, 5, 6, 20, 40, 63)}
        b.pwrite_many([(i * PAGE_SIZE, memoryview(data)) for i, data in pages.items()])
        whole = b.read_sync(0, SIZE)
        for i in range(SIZE // PAGE_SIZE):
            assert whole[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == pages.get(i, bytes(PAGE_SIZE)), i
    finally:
        b.close()


def test_a_read_leaves_the_access_time_alone(disk_dir: str) -> None:
    """An access-time update is a journal transaction on ext4 or xfs without lazytime, on
    the swap-in path: the file is opened O_NOATIME."""
    path = os.path.join(disk_dir, "backing")
    b = Backing.open(path, SIZE)
    try:
        b.pwrite_many([(0, memoryview(b"x" * PAGE_SIZE))])
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns - 3 * 86400 * 10**9, st.st_mtime_ns))  # relatime would update it
        before = os.stat(path).st_atime_ns
        assert b.read_sync(0, PAGE_SIZE) == b"x" * PAGE_SIZE
        assert os.stat(path).st_atime_ns == before
    finally:
        b.close()


def test_a_write_that_makes_no_progress_fails_instead_of_spinning(disk_dir: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE)
    try:
        monkeypatch.setattr(backing_module.os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError, match="no progress"):
            b.pwrite_many([(0, memoryview(b"x" * PAGE_SIZE))])
    finally:
        monkeypatch.undo()
        b.close()


def test_the_loops_own_read_takes_no_new_buffer_when_every_worker_holds_one(disk_dir: str) -> None:
    """A buffer made on the I/O path is not yet resident: its first use faults, under pressure."""
    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE)
    try:
        assert b._bounce is not None
        held = [b._bounce.take() for _ in range(backing_module.READ_THREADS + backing_module.WRITE_THREADS)]
        assert b._bounce._free, "no buffer left for the read done on the event loop"
        b._bounce.give(b._bounce.take())
        for buf in held:
            b._bounce.give(buf)
    finally:
        b.close()


# -- block devices -----------------------------------------------------------------------


@contextlib.contextmanager
def loop_device(image: str) -> Iterator[str]:
    """A loop device over ``image`` (no direct I/O, no swap: only what vswapfs reads)."""
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _need_loop() -> None:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup, for a loop device to stand in for a disk")


def test_a_block_device_is_used_whole_or_in_part_and_locked(disk_dir: str) -> None:
    _need_loop()
    image = os.path.join(disk_dir, "disk.img")
    _make(image, size=2 * SIZE)
    with loop_device(image) as dev:
        b = Backing.open(dev, None)
        try:
            assert b.device and b.size == 2 * SIZE and b.pressure_risks == []
            b.pwrite(PAGE_SIZE, b"\x77" * PAGE_SIZE)
            assert b.read_sync(PAGE_SIZE, PAGE_SIZE) == b"\x77" * PAGE_SIZE
            with pytest.raises(BackingError, match="in use"):
                Backing.open(dev, None)  # O_EXCL: one vswapfs per device
        finally:
            b.close()
        part = Backing.open(dev, SIZE)
        part.close()
        assert part.size == SIZE
        with pytest.raises(BackingError, match="less than"):
            Backing.open(dev, 4 * SIZE)


@pytest.mark.parametrize("what, command", [
    ("a swap area", ["mkswap"]),
    ("an ext2/3/4 filesystem", ["mkfs.ext4", "-q", "-F"]),
])
def test_a_block_device_with_something_on_it_is_refused(disk_dir: str, what: str, command: list[str]) -> None:
    _need_loop()
    if not shutil.which(command[0]):
        pytest.skip(f"no {command[0]}")
    image = os.path.join(disk_dir, "disk.img")
    _make(image, size=16 << 20)
    with loop_device(image) as dev:
        subprocess.run([*command, dev], check=True, capture_output=True)
        with pytest.raises(BackingError, match=f"holds {what}"):
            Backing.open(dev, None)
        with open(image, "rb") as f:
            head = f.read(1 << 20)
        assert signature(head) == what


def test_a_mounted_block_device_is_refused(disk_dir: str) -> None:
    _need_loop()
    if not shutil.which("mkfs.ext4"):
        pytest.skip("no mkfs.ext4")
    image = os.path.join(disk_dir, "disk.img")
    _make(image, size=16 << 20)
    mnt = os.path.join(disk_dir, "mnt")
    os.mkdir(mnt)
    with loop_device(image) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            with pytest.raises(BackingError, match="is mounted"):
                check_device(dev, os.stat(dev))
        finally:
            subprocess.run(["umount", mnt], check=True)


def test_a_ram_disk_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = os.stat("/dev/null")
    monkeypatch.setattr("vswapfs.backingcheck._sysfs", lambda dev: "/sys/block/zram0")
    with pytest.raises(BackingError, match="keeps its data in RAM"):
        check_device("/dev/zram0", fake)


async def test_small_reads_run_on_the_loop_until_the_disk_is_slow(disk_dir: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap-in read is cheaper done in place than handed to a worker thread, but a slow
    disk must not hold up the whole daemon: once small reads take long, they move to threads."""
    import threading
    import time

    b = Backing.open(os.path.join(disk_dir, "backing"), SIZE)
    where: list[bool] = []  # per read: on the event loop's thread?
    real = backing_module._pread_all
    delay = [0.0]

    def pread_all(fd: int, out: memoryview, offset: int, path: str) -> None:
        where.append(threading.current_thread() is threading.main_thread())
        time.sleep(delay[0])
        real(fd, out, offset, path)

    monkeypatch.setattr(backing_module, "_pread_all", pread_all)
    out = memoryview(bytearray(8 * PAGE_SIZE))
    try:
        for _ in range(5):
            await b.read_into(0, out)
        assert where == [True] * 5
        delay[0] = 0.02  # ten times the limit
        where.clear()
        for _ in range(20):
            await b.read_into(0, out)
        assert where[0] and not any(where[-10:])  # the slow ones moved to worker threads
        await b.read_into(0, memoryview(bytearray(64 * PAGE_SIZE)))  # a large read always does
        assert not where[-1]
    finally:
        b.close()


def test_a_loop_device_says_which_filesystem_its_file_is_on(disk_dir: str) -> None:
    """What up checks after losetup: the loop device is on our mount, not only on our path."""
    _need_loop()
    from vswapctl.system import loop_backing_device

    image = os.path.join(disk_dir, "disk.img")
    _make(image)
    st = os.stat(image)
    with loop_device(image) as dev:
        assert loop_backing_device(dev) == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert loop_backing_device(os.path.join(disk_dir, "no-such-loop")) is None


def test_up_says_why_a_new_backing_file_could_not_be_written(disk_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while `up` writes the new file: a one-line reason (UpFailed), not a traceback."""
    from vswapctl import device

    def full(fd: int, size: int, path: str, direct: bool) -> None:
        raise BackingError(f"cannot write {path} in full (No space left on device)")

    monkeypatch.setattr(backing_module, "fill", full)
    path = os.path.join(disk_dir, "backing")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(device.UpFailed, match="No space left"):
            device._fill(fd, path, SIZE, lambda line: None)
    finally:
        os.close(fd)
