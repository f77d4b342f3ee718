"""Shared fixtures.  Levels that cannot run here skip with the reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from vswapfs.backing import BackingError, check_location


def _disk_dir_reason(path: str) -> str | None:
    try:
        check_location(os.path.join(path, "probe"), None)
    except BackingError as exc:
        return str(exc)
    return None


@pytest.fixture
def disk_dir() -> Iterator[str]:
    """A temporary directory on a disk filesystem (backing files must not be on tmpfs)."""
    for base in (tempfile.gettempdir(), "/var/tmp"):
        if os.path.isdir(base) and _disk_dir_reason(base) is None:
            path = tempfile.mkdtemp(prefix="vswapfs-test-", dir=base)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return
    pytest.skip("no temporary directory on a disk filesystem (both /tmp and /var/tmp are tmpfs)")


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 not importable: {exc}"
    return None


def swap_unavailable() -> str | None:
    reason = fuse_unavailable()
    if reason:
        return reason
    if os.geteuid() != 0:
        return "live swap needs root"
    for tool in ("losetup", "mkswap", "swapon", "swapoff"):
        if not shutil.which(tool):
            return f"{tool} not found"
    from vswapctl import cgroup

    try:
        cgroup.detect()
    except cgroup.CgroupUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture
def autojump_clock():
    """pytest-trio's autojump clock, but one that waits 50 ms of real idleness
    before jumping: the backing file's I/O runs in worker threads, and a clock
    that jumps the moment every task waits would leap ahead while a thread works."""
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0.05)
