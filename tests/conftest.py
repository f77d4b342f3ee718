"""Shared fixtures.  Levels that cannot run here skip with the reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from vswapfs.backingcheck import BackingError, check_location


def _disk_dir_reason(path: str) -> str | None:
    try:
        check_location(os.path.join(path, "probe"), None)
    except BackingError as exc:
        return str(exc)
    return None


PROJECT_TMP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".test-tmp")


def disk_base() -> str:
    """A directory on a disk filesystem for backing files (never tmpfs: docs/operations.md, "Things that bite").

    /tmp, then /var/tmp, then a directory in the checkout.  If none is on a
    disk, the tests that need one fail, saying so: the page rules are not
    something to skip quietly."""
    reasons = []
    for base in (tempfile.gettempdir(), "/var/tmp", PROJECT_TMP):
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as exc:
            reasons.append(f"{base}: {exc.strerror}")
            continue
        reason = _disk_dir_reason(base)
        if reason is None:
            return base
        reasons.append(reason)
    raise RuntimeError("no directory on a disk filesystem for backing files: " + "; ".join(reasons))


def poke(path: str, offset: int, data: bytes) -> None:
    """Change a backing file behind its daemon's back (its own descriptor is O_DIRECT,
    and takes whole, aligned pages only)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.fixture
def disk_dir() -> Iterator[str]:
    """A temporary directory on a disk filesystem (backing files must not be on tmpfs)."""
    path = tempfile.mkdtemp(prefix="vswapfs-test-", dir=disk_base())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "not root, and /dev/fuse is not open to this user"
        if not shutil.which("fusermount3"):
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


from .rediscluster import redis_cluster, redis_cluster_session  # noqa: E402,F401 (fixtures)


@pytest.fixture
def autojump_clock():
    """pytest-trio's autojump clock, but one that waits 50 ms of real idleness
    before jumping: the backing file's I/O runs in worker threads, and a clock
    that jumps the moment every task waits would leap ahead while a thread works."""
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0.05)
