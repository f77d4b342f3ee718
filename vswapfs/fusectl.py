"""The kernel's FUSE connection knobs (fusectl, Documentation/filesystems/fuse.rst).

Swap reaches vswapfs as asynchronous ("background") FUSE requests, and the
kernel keeps at most ``max_background`` of them in flight (12 by default).
Reads waiting for a slow or stopped store would fill those slots, and swap-out
writes, which could go to the backing file at once, would queue behind them.
Root can raise the limit in ``/sys/fs/fuse/connections/N/``, where N is the
minor number of the mount's device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

CONNECTIONS = "/sys/fs/fuse/connections"
log = logging.getLogger("vswapfs.fusectl")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
LOCK = "/run/lock/vswapfs-fusectl.lock" if os.path.isdir("/run/lock") else "/tmp/vswapfs-fusectl.lock"


def connection_of(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> int | None:
    """The FUSE connection number of the mount at ``mountpoint``, an absolute path
    already resolved: read from mountinfo, because any stat of the mount point (a
    realpath too) asks the daemon, which may be the caller itself."""
    target = mountpoint
    found = None
    with open(mountinfo) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4].replace("\\040", " ") == target:
                major, _, minor = parts[2].partition(":")
                if major == "0":
                    found = int(minor)
    return found


def is_mounted(mounts: str = "/proc/self/mounts") -> bool:
    with open(mounts) as f:
        return any(line.split()[1:3] == [CONNECTIONS, "fusectl"] for line in f if len(line.split()) > 2)


@contextmanager
def mounted(lock_path: str = LOCK) -> Iterator[None]:
    """fusectl at /sys/fs/fuse/connections for the duration: systemd mounts it, a bare
    machine may not.  What we mount we unmount again, so that nothing of ours stays
    behind.  vswapfs processes take turns (a lock file), so that one never unmounts
    it under another, nor finds it busy and leaves it mounted."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if is_mounted():
            yield
            return
        # The system calls, not mount(8)/umount(8) through PATH: a pseudo filesystem of
        # the kernel's, mounted for a moment, must come off whatever stands in for
        # umount (the tests put a failing one first on PATH).
        if _libc.mount(b"fusectl", CONNECTIONS.encode(), b"fusectl", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount fusectl at {CONNECTIONS}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.umount2(CONNECTIONS.encode(), 0) != 0:
                err = ctypes.get_errno()
                log.warning("could not unmount fusectl at %s again (%s): it stays mounted", CONNECTIONS,
                            os.strerror(err))
    finally:
        os.close(fd)


def set_limits(connection: int, max_background: int, congestion_threshold: int) -> None:
    base = os.path.join(CONNECTIONS, str(connection))
    for name, value in (("max_background", max_background), ("congestion_threshold", congestion_threshold)):
        fd = os.open(os.path.join(base, name), os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)


def set_limits_mounted(connection: int, max_background: int, congestion_threshold: int) -> None:
    with mounted():
        set_limits(connection, max_background, congestion_threshold)


def read_limit(connection: int, name: str) -> int:
    with mounted(), open(os.path.join(CONNECTIONS, str(connection), name)) as f:
        return int(f.read())
