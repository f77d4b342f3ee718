"""The system side of a swap device: loop devices, swap, mounts, processes.

Everything here reads /proc and /sys rather than probing block devices:
once a loop device hangs, ``swapon --show``, ``blkid`` and ``lsblk -f`` hang
with it (HAZARDS.md, item 3).  Every command gets an explicit device.
"""

from __future__ import annotations

import glob
import os
import subprocess


class CommandFailed(Exception):
    """A system command failed; the message carries its stderr."""


def run(argv: list[str], timeout: float = 120.0) -> str:
    if not all(argv):
        raise CommandFailed(f"refusing to run {argv!r}: an argument is empty")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]} not found: install util-linux / fuse3") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise CommandFailed(f"{' '.join(argv)}: {message[-1] if message else f'exit {done.returncode}'}")
    return done.stdout


def swaps() -> dict[str, dict[str, int]]:
    """/proc/swaps as {device: {size_kib, used_kib, priority}}."""
    out: dict[str, dict[str, int]] = {}
    with open("/proc/swaps") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 5:
                out[parts[0]] = {"size_kib": int(parts[2]), "used_kib": int(parts[3]), "priority": int(parts[4])}
    return out


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint``, if any (from /proc/mounts)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].replace("\\040", " ") == target:
                found = parts[2]
    return found


def loops_for(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (read from /sys, no device probing)."""
    target = os.path.realpath(path)
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.removesuffix(" (deleted)") == target:
            found.append("/dev/" + backing.split("/")[3])
    return sorted(found)


def wait_detached(path: str, timeout: float = 10.0) -> list[str]:
    """After ``losetup -d``: the loop driver lets go of its file asynchronously.
    Waits until no loop device holds ``path``; returns those that still do."""
    import time

    deadline = time.monotonic() + timeout
    while (left := loops_for(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def loops_under(directory: str) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    root = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if name.startswith(root):
            found.append("/dev/" + backing.split("/")[3])
    return sorted(found)


def loop_dio(device: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
