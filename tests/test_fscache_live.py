"""The FS-cache live, as root: a working set 8x a memory cgroup's limit read through the mount.

The reader runs in a memory cgroup (``vswapctl.treeread``: every file's sha256), so
the mount's page cache cannot hold the tree and the second pass asks fscache again;
the daemons run outside it.  No swap is turned on: the page cache squeezed here is
clean, and reclaim simply drops it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio

from pagewire.address import Address
from pagewire.messages import PAGE_SIZE, Stats
from vswapctl import cachebench, cachemount
from vswapfs.hostclient import query

from .conftest import swap_unavailable
from .daemons import wait_for

pytestmark = [pytest.mark.swap, pytest.mark.skipif(swap_unavailable() is not None, reason=str(swap_unavailable()))]

LIMIT = 16 << 20
TREE = 8 * LIMIT


class Live:
    def __init__(self, base: str) -> None:
        self.lower = os.path.join(base, "lower")
        self.mnt = os.path.join(base, "mnt")
        self.state_dir = os.path.join(base, "state")
        self.pressure = os.path.join(base, "pressure")
        self.set_pressure(10)
        self.want = cachebench.make_tree(self.lower, TREE, file_size=1 << 20)
        cfg = cachemount.CacheConfig(self.lower, self.mnt, capacity=2 * TREE, size=2 * TREE,
                                     pressure_source=f"file:{self.pressure}")
        self.state = cachemount.bring_up(self.state_dir, cfg, lambda m: None)

    def set_pressure(self, percent: int) -> None:
        cachebench.set_pressure(self.pressure, percent)

    def cache(self) -> dict:
        stats = cachemount.stats(self.state)
        assert stats is not None
        return stats["cache"]

    def store(self) -> dict:
        return trio.run(query, Address("unix", path=self.state.socket), Stats(), 5.0)

    def read_pass(self) -> tuple[int, int]:
        """One pass over the tree from the cgroup, every file checked; (hits, misses) it took
        (of the pages that reached fscache: the kernel may still hold some of the mount's
        pages from an earlier pass, charged to the cgroup's parent once it is gone)."""
        before = self.cache()
        cachebench.read_in_cgroup(self.mnt, LIMIT, self.want)
        after = self.cache()
        return after["host_hits"] - before["host_hits"], after["host_misses"] - before["host_misses"]


@pytest.fixture
def live(disk_dir: str) -> Iterator[Live]:
    state_dir = os.path.join(disk_dir, "state")
    try:
        yield Live(disk_dir)
    finally:
        cachemount.take_down(state_dir, lambda m: None)


def test_second_pass_from_the_store_then_pressure_drops_the_pool(live: Live) -> None:
    pages = TREE // PAGE_SIZE
    hits, misses = live.read_pass()
    assert hits == 0 and misses == pages
    hits, misses = live.read_pass()
    assert hits >= 0.7 * (hits + misses), (hits, misses)
    assert cachebench.resident_bytes(live.lower) <= TREE // 10  # no second copy in LOWER's page cache
    held = live.store()["ephemeral_pages"]
    assert held == pages
    live.set_pressure(99)
    wait_for(lambda: live.store()["ephemeral_pages"] == 0, 30, "the store dropping the pool")
    store = live.store()
    assert store["dropped_pressure"] == held
    assert store["handed_back_pressure"] == store["handed_back_drain"] == 0  # nothing written anywhere
    live.set_pressure(10)
    hits, misses = live.read_pass()  # from LOWER again (what the kernel kept aside), and right
    assert hits == 0 and misses > 0
    c = live.cache()
    assert c["stale_copies"] == 0 and c["io_errors"] == 0 and c["lower_changes"] == 0


def test_writes_through_the_mount_and_to_lower_are_seen_at_once(live: Live) -> None:
    live.read_pass()
    name = sorted(live.want)[0]
    through, lower = os.path.join(live.mnt, name), os.path.join(live.lower, name)
    fd = os.open(through, os.O_WRONLY)
    os.pwrite(fd, b"through the mount", 5 * PAGE_SIZE + 7)
    os.close(fd)
    with open(lower, "rb") as f:
        live.want[name] = cachebench.hashlib.sha256(f.read()).hexdigest()
    fd = os.open(lower, os.O_WRONLY)
    os.pwrite(fd, b"behind its back", os.fstat(fd).st_size)  # it grows: seen whatever the clock's tick
    os.close(fd)
    with open(lower, "rb") as f:
        live.want[name] = cachebench.hashlib.sha256(f.read()).hexdigest()
    hits, misses = live.read_pass()
    assert hits > 0
    c = live.cache()
    assert c["lower_changes"] == 1 and c["invalidated_pages"] >= 1 and c["stale_copies"] == 0
