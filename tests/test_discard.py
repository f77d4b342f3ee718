"""Freed swap slots reach the store: fallocate(PUNCH_HOLE) -> page map and store.  The
backing file keeps its blocks: a hole there would make the next write allocate, a journal
transaction on the swap-out path (docs/pressure.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import pytest

from pagewire.protocol import PAGE_SIZE
from vswapfs.backing import Backing
from vswapfs.extents import unwritten_ranges
from vswapfs.fs import PUNCH_HOLE as PUNCH
from vswapfs.pagemap import BACKING, HOST, UNWRITTEN
from vswapfs.pager import Pager, covered_pages

from .conftest import fuse_unavailable
from .daemons import Daemons
from .fakestore import FakeStore

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def page(n: int, version: int = 1) -> bytes:
    """Not same-filled (its last word differs): it must travel to the store."""
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8 - 1) + b"not same"


# -- byte ranges -> pages ------------------------------------------------------------------

@pytest.mark.parametrize(
    "offset,length,expected",
    [
        (0, PAGE_SIZE, (0, 1)),
        (0, 10 * PAGE_SIZE, (0, 10)),
        (1, PAGE_SIZE, (0, 0)),  # covers no whole page
        (1, 2 * PAGE_SIZE, (1, 1)),  # partial pages at both edges left alone
        (PAGE_SIZE - 1, PAGE_SIZE + 2, (1, 1)),
        (PAGE_SIZE, PAGE_SIZE - 1, (0, 0)),
        (98 * PAGE_SIZE, 10 * PAGE_SIZE, (98, 2)),  # clipped at the end of a 100-page device
        (100 * PAGE_SIZE, PAGE_SIZE, (0, 0)),  # wholly past the end
        (200 * PAGE_SIZE, PAGE_SIZE, (0, 0)),
        (0, 0, (0, 0)),
        (-PAGE_SIZE, 2 * PAGE_SIZE, (0, 0)),
    ],
)
def test_covered_pages(offset: int, length: int, expected: tuple[int, int]) -> None:
    assert covered_pages(offset, length, 100) == expected


# -- pager ----------------------------------------------------------------------------------

@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), 64 * PAGE_SIZE)
    yield b
    b.close()


async def test_discard_forgets_pages_everywhere(backing: Backing) -> None:
    store = FakeStore(64, capacity=8)
    pager = Pager(backing, store)
    await pager.write(0, b"".join(page(i) for i in range(16)))  # 8 in the host, 8 in backing
    counts = pager.map.counts()
    assert (counts["host"], counts["backing"], counts["unwritten"]) == (8, 8, 48)
    blocks_before = os.fstat(backing.fd).st_blocks
    # Bytes 1 .. 14 pages + 1: pages 1..13 whole; pages 0 and 14 partial, left alone.
    await pager.discard(1, 14 * PAGE_SIZE)
    assert [pager.map.get(p) for p in (0, 1, 13, 14, 15)] == [HOST, UNWRITTEN, UNWRITTEN, BACKING, BACKING]
    s = pager.stats()
    assert (s["discard_requests"], s["discard_pages"], s["discard_host_pages"]) == (1, 13, 7)
    assert store.pages_stored == 1 and store.store.stats()["invalidate_requests"] == 1
    assert os.fstat(backing.fd).st_blocks == blocks_before and unwritten_ranges(backing.fd, backing.size) == []
    data = await pager.read(0, 16 * PAGE_SIZE)
    assert data == page(0) + bytes(13 * PAGE_SIZE) + page(14) + page(15)


async def test_discard_while_the_store_is_down_is_retried(backing: Backing) -> None:
    import trio

    store = FakeStore(64)
    pager = Pager(backing, store)
    await pager.write(0, page(0) + page(1))
    store.disconnect()
    await pager.discard(0, 2 * PAGE_SIZE)
    assert pager.map.counts()["unwritten"] == 64 and store.pages_stored == 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.drop_orphans)
        store.reconnect()
        with trio.fail_after(5):
            while store.pages_stored:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert pager.stats()["discard_host_pages"] == 2


# -- mounted ----------------------------------------------------------------------------------

def fuse(test):
    """A test that mounts a vswapfs: marked `fuse`, skipped with the reason where FUSE is unusable."""
    return pytest.mark.fuse(pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))(test))


@pytest.fixture
def daemons(disk_dir: str):
    d = Daemons(disk_dir, capacity="256K", size="4M")  # 64 pages in the store, 1024 on the device
    try:
        yield d.start()
    finally:
        d.stop()


@fuse
def test_punch_hole_on_the_mounted_file(daemons: Daemons) -> None:
    fd = os.open(daemons.swapfile, os.O_RDWR)
    try:
        os.pwrite(fd, b"".join(page(i) for i in range(128)), 0)  # pages 0-63 host, 64-127 backing
        before, host_before = daemons.stats(), daemons.host_stats()
        assert before["discard_supported"] is True, "pyfuse3 lacks the fallocate patch"
        assert (before["pages_host"], before["pages_backing"]) == (64, 64)
        blocks_before = os.stat(daemons.backing).st_blocks
        # Pages 32..95: 32 in the host, 32 in backing.  Unaligned edges: pages 31 and 96 stay.
        fallocate(fd, PUNCH, 32 * PAGE_SIZE - 100, 64 * PAGE_SIZE + 200)
        after, host_after = daemons.stats(), daemons.host_stats()
        assert host_before["pages_stored"] - host_after["pages_stored"] == 32
        assert after["discard_host_pages"] == 32
        assert after["discard_requests"] == 1 and (after["pages_host"], after["pages_backing"]) == (32, 32)
        assert os.stat(daemons.backing).st_blocks == blocks_before  # no hole: the next write there allocates nothing
        data = os.pread(fd, 128 * PAGE_SIZE, 0)
        expected = b"".join(page(i) for i in range(32)) + bytes(64 * PAGE_SIZE) + \
            b"".join(page(i) for i in range(96, 128))
        assert data == expected
        # Other modes are refused clearly; a punch past the end is harmless.
        with pytest.raises(OSError) as info:
            fallocate(fd, 0x10, 0, PAGE_SIZE)  # FALLOC_FL_ZERO_RANGE
        assert info.value.errno == errno.EOPNOTSUPP
        fallocate(fd, PUNCH, 2048 * PAGE_SIZE, PAGE_SIZE)
        assert os.pread(fd, PAGE_SIZE, 0) == page(0)
    finally:
        os.close(fd)


@fuse
def test_without_the_patch_vswapfs_runs_and_says_discard_is_off(disk_dir: str, tmp_path) -> None:
    """Simulate an unpatched pyfuse3 by hiding Operations.fallocate before vswapfs imports it."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import pyfuse3\ndel pyfuse3.Operations.fallocate\n")
    d = Daemons(disk_dir, capacity="256K", size="4M")
    env_backup = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{shim}:{env_backup}" if env_backup else str(shim)
    try:
        d.start()
        assert d.stats()["discard_supported"] is False
        fd = os.open(d.swapfile, os.O_RDWR)
        os.pwrite(fd, page(1), PAGE_SIZE)
        assert os.pread(fd, PAGE_SIZE, PAGE_SIZE) == page(1)  # still works
        os.close(fd)
    finally:
        if env_backup is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_backup
        d.stop()
    with open(os.path.join(disk_dir, "vswapfs.log")) as f:
        assert sum("discard is unavailable" in line for line in f) == 1
