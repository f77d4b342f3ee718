"""Writes keep being answered in time while something else is slow: the backing
disk (a throttled loop device), or the store (SIGSTOP) with reads waiting for it.

Through a loop device on the mounted file with O_DIRECT, as swap reaches
vswapfs (asynchronous requests), but never swapped on.  (Synchronous direct
writes to the file itself are serialized by the kernel's FUSE code, one per
inode at a time, unless the daemon asks for parallel direct writes, which the
libfuse 3.14 that pyfuse3 builds against here cannot pass on.)  The slow disk is an
ext4 on a loop device throttled to 10 I/Os per second through the cgroup v1
blkio controller, with a strict per-device dirty limit so that buffered writes
to it really wait; it needs root and cgroup v1 blkio, and skips otherwise.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time

import pytest

from vswapctl import system
from vswapctl.faults import Device, pattern

from .conftest import fuse_unavailable
from .daemons import Daemons

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable())),
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
]

BLKIO = "/sys/fs/cgroup/blkio"
IOPS = 4


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@pytest.fixture
def slow_disk(disk_dir: str):
    if os.geteuid() != 0:
        pytest.skip("a throttled loop device needs root")
    if not os.path.exists(f"{BLKIO}/blkio.throttle.write_iops_device"):
        pytest.skip("no cgroup v1 blkio throttling here")
    image, mnt = os.path.join(disk_dir, "slow.img"), os.path.join(disk_dir, "slow")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    loop = system.run(["losetup", "--find", "--show", image]).strip()
    majmin = open(f"/sys/block/{os.path.basename(loop)}/dev").read().strip()
    bdi = f"/sys/class/bdi/{majmin}"
    try:
        system.run(["mkfs.ext4", "-q", loop])
        system.run(["mount", loop, mnt])
        _write(f"{bdi}/strict_limit", "1")
        _write(f"{bdi}/max_bytes", str(512 << 10))
        for kind in ("write", "read"):
            _write(f"{BLKIO}/blkio.throttle.{kind}_iops_device", f"{majmin} {IOPS}")
        yield mnt
    finally:
        for kind in ("write", "read"):
            _write(f"{BLKIO}/blkio.throttle.{kind}_iops_device", f"{majmin} 0")
        if os.path.exists(bdi):
            _write(f"{bdi}/strict_limit", "0")
            _write(f"{bdi}/max_ratio", "100")
        subprocess.run(["umount", mnt], check=False)
        system.run(["losetup", "-d", loop])


def attach(d: Daemons) -> str:
    """A loop device with direct I/O on the swap file, not swapped on (d.stop detaches it)."""
    loop = system.run(["losetup", "--direct-io=on", "--find", "--show", d.swapfile]).strip()
    assert loop in system.loops_for(d.swapfile) and system.loop_dio(loop)
    return loop


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"p50 {statistics.median(ordered) * 1e3:.1f} ms, p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1e3:.1f} "
            f"ms, max {ordered[-1] * 1e3:.1f} ms")


def test_store_writes_stay_fast_while_the_backing_disk_is_slow(disk_dir: str, slow_disk: str) -> None:
    d = Daemons(disk_dir, capacity="1M", size="16M", extra_vswapfs=["--write-timeout", "1"],
                backing_path=os.path.join(slow_disk, "backing"))
    try:
        d.start()
        d.wait_host_connected()
        loop = attach(d)
        fast, slow = Device(loop), Device(loop)
        for first in range(0, 256, 64):
            fast.write(first, [1] * 64)  # pages 0..255 fill the store
        slow_latencies: list[float] = []
        done = threading.Event()

        def to_the_slow_disk() -> None:
            for i in range(40):  # new pages: the store is full, they go to the backing file
                slow_latencies.append(slow.write(1024 + i * 64, [2] * 64))
            done.set()

        writer = threading.Thread(target=to_the_slow_disk)
        writer.start()
        fast_latencies: list[float] = []
        version = 2
        while not done.is_set():
            version += 1
            for first in range(0, 256, 8):  # rewrites of stored pages: the store takes them
                fast_latencies.append(fast.write(first, [version] * 8))
        writer.join()
        stats = d.stats()
        print(f"\nslow backing disk ({IOPS} IOPS): backing writes of 64 pages {quantiles(slow_latencies)}; "
              f"store writes of 8 pages meanwhile ({len(fast_latencies)}): {quantiles(fast_latencies)}")
        # The disk really was slow: writes to it waited, some for a long time ...
        assert max(slow_latencies) > 0.2 and sum(slow_latencies) > 1.0, "the disk was not slow: nothing shown"
        # ... and no write the store took waited behind them.
        assert max(fast_latencies) < max(slow_latencies) / 2 and stats["fallback_timeout"] == 0
        for page in (0, 100, 255):
            assert fast.read(page) == pattern(page, version)
        for page in (1024, 1024 + 40 * 64 - 1):
            assert fast.read(page) == pattern(page, 2)
        fast.close()
        slow.close()
    finally:
        d.stop()


def test_writes_are_answered_while_many_reads_wait_for_a_stopped_store(disk_dir: str) -> None:
    # Reads over the wire, which wait for the store (with shared memory they would not).
    d = Daemons(disk_dir, capacity="1M", size="16M", extra_vswapfs=["--write-timeout", "0.5", "--no-shared-memory"])
    d.start()
    readers: list[threading.Thread] = []
    devices: list[Device] = []
    try:
        d.wait_host_connected()
        loop = attach(d)
        dev = Device(loop)
        devices.append(dev)
        for first in range(0, 256, 64):
            dev.write(first, [1] * 64)
        results: dict[int, bytes | None] = {}

        def read(page: int) -> None:
            reader = Device(loop)
            try:
                results[page] = reader.read(page)
            finally:
                reader.close()

        d.signal_hoststore(signal.SIGSTOP)
        try:
            asked = d.stats()["read_requests"]
            for page in range(96):  # more reads waiting for the store than the old 64 FUSE workers
                t = threading.Thread(target=read, args=(page,))
                t.start()
                readers.append(t)
            deadline = time.monotonic() + 20
            while d.stats()["read_requests"] == asked:  # they reach vswapfs...
                assert time.monotonic() < deadline, "the reads never reached vswapfs"
                time.sleep(0.01)
            assert not results  # ...and wait there
            latencies = [dev.write(512 + i * 8, [3] * 8) for i in range(20)]
        finally:
            d.signal_hoststore(signal.SIGCONT)
        for t in readers:
            t.join(30)
        print(f"\nstopped store, 96 reads waiting: writes of 8 pages {quantiles(latencies)} (write timeout 0.5 s)")
        assert max(latencies) < 2.0
        assert results == {page: pattern(page, 1) for page in range(96)}
        for i in range(20):
            assert dev.read(512 + i * 8) == pattern(512 + i * 8, 3)
    finally:
        # Whatever failed, nothing of ours may keep the device open, or the teardown
        # (rightly) leaves everything running.
        d.signal_hoststore(signal.SIGCONT)
        for t in readers:
            t.join(60)
        for device in devices:
            device.close()
        d.stop()
