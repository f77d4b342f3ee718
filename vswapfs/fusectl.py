"""The kernel's FUSE connection knobs (fusectl, Documentation/filesystems/fuse.rst).

Swap reaches vswapfs as asynchronous ("background") FUSE requests, and the
kernel keeps at most ``max_background`` of them in flight (12 by default).
Reads waiting for a slow or stopped store would fill those slots, and swap-out
writes, which could go to the backing file at once, would queue behind them.
Root can raise the limit in ``/sys/fs/fuse/connections/N/``, where N is the
minor number of the mount's device.
"""

from __future__ import annotations

import os
import subprocess

CONNECTIONS = "/sys/fs/fuse/connections"


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


def ensure_mounted() -> bool:
    """fusectl at /sys/fs/fuse/connections (systemd mounts it; a bare machine may not)."""
    if os.path.isdir(CONNECTIONS) and os.listdir(CONNECTIONS):
        return True
    done = subprocess.run(["mount", "-t", "fusectl", "fusectl", CONNECTIONS], capture_output=True, text=True,
                          timeout=10)
    return done.returncode == 0


def set_limits(connection: int, max_background: int, congestion_threshold: int) -> None:
    base = os.path.join(CONNECTIONS, str(connection))
    for name, value in (("max_background", max_background), ("congestion_threshold", congestion_threshold)):
        fd = os.open(os.path.join(base, name), os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)


def read_limit(connection: int, name: str) -> int:
    with open(os.path.join(CONNECTIONS, str(connection), name)) as f:
        return int(f.read())
