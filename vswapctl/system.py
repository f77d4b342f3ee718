"""The system side of a swap device: loop devices, swap, mounts, processes.

Everything here reads /proc and /sys rather than probing block devices:
once a loop device hangs, ``swapon --show``, ``blkid`` and ``lsblk -f`` hang
with it (HAZARDS.md, item 3).  Every command gets an explicit device.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time


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


def loop_dio(device: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(pid: int, timeout: float = 10.0) -> str:
    """SIGTERM, then SIGKILL if it lingers; says which it took."""
    if not alive(pid):
        return "not running"
    os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, timeout):
        return "stopped"
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, 5)
    return "killed (did not stop on SIGTERM)"
