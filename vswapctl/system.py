"""The system side of a swap device: commands, loop devices, swap, mounts.

Everything here reads /proc and /sys rather than probing block devices: once a
loop device hangs, ``swapon --show``, ``blkid`` and ``lsblk -f`` hang with it.
Nothing here resolves a path at or below a vswapfs mount point either: a
``stat`` there (``realpath`` does one) is a request to vswapfs, which may be
stopped.  Paths are resolved once, by ``up``, before anything is mounted, and
compared as strings afterwards.  Every command gets an explicit device and a
timeout that really bounds it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time


class CommandFailed(Exception):
    """A system command failed, or did not finish; the message says which."""


def run(argv: list[str], timeout: float = 120.0) -> str:
    """Run a command found through PATH; its stdout, or CommandFailed.

    A command still running after ``timeout`` is killed; one that cannot even be
    killed (stuck in the kernel, as a swapoff over a hung loop device is) is left
    behind rather than waited for."""
    if not all(argv):
        raise CommandFailed(f"refusing to run {argv!r}: an argument is empty")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]} not found: install util-linux / fuse3") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"{' '.join(argv)} did not finish in {timeout:.0f}s and cannot be killed "
                                f"(stuck in the kernel?): pid {proc.pid} left behind") from None
        raise CommandFailed(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None
    if proc.returncode != 0:
        message = (err or out).strip().splitlines()
        raise CommandFailed(f"{' '.join(argv)}: {message[-1] if message else f'exit {proc.returncode}'}")
    return out


def resolve_mountpoint(path: str) -> str:
    """The absolute, symlink-free path of a mount point-to-be, resolving only its
    parent: never a stat of the directory itself, which may already be mounted."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# -- mounts ---------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """/proc/mounts and mountinfo write space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_type(target: str) -> str | None:
    """The filesystem type mounted exactly at ``target`` (a resolved path), if any."""
    found = None
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and _unescape(parts[1]) == target:
                found = parts[2]
    return found


MOUNTINFO = "/proc/self/mountinfo"


def mount_devices(target: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """``major:minor`` of every mount exactly at ``target``, in mount order: the last is on top."""
    with open(mountinfo) as f:
        rows = [line.split() for line in f]
    return [parts[2] for parts in rows if len(parts) > 4 and _unescape(parts[4]) == target]


def mount_device(target: str) -> str | None:
    """``major:minor`` of what is mounted exactly at ``target`` (the top mount), if anything."""
    devices = mount_devices(target)
    return devices[-1] if devices else None


def mounts_under(directory: str) -> list[str]:
    root = directory.rstrip("/") + "/"
    with open("/proc/mounts") as f:
        return [m for m in (_unescape(line.split()[1]) for line in f if len(line.split()) > 1)
                if m == directory or m.startswith(root)]


# -- swap -----------------------------------------------------------------------------------


def swaps() -> dict[str, dict[str, int]]:
    """/proc/swaps as {device: {size_kib, used_kib, priority}} (for people to read)."""
    out: dict[str, dict[str, int]] = {}
    with open("/proc/swaps") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 5:
                out[parts[0]] = {"size_kib": int(parts[-3]), "used_kib": int(parts[-2]), "priority": int(parts[-1])}
    return out


def swapped_on_devices() -> set[int]:
    """Device numbers of the block devices swapped on: compared by number, a swap
    entry under another name (or a deleted node) still counts."""
    devices = set()
    with open("/proc/swaps") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) < 5 or parts[-4] != "partition":
                continue
            name = _unescape(" ".join(parts[:-4])).removesuffix(" (deleted)")
            try:
                st = os.stat(name)  # a node in /dev: no device is probed
            except OSError:
                continue
            devices.add(st.st_rdev)
    return devices


def loop_number(loop: str) -> int | None:
    """The device number of /dev/loopN, from sysfs."""
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/dev") as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))


def swapped_on(loop: str, active: set[int] | None = None) -> bool:
    number = loop_number(loop)
    return number is not None and number in (active if active is not None else swapped_on_devices())


# -- loop devices ---------------------------------------------------------------------------


def _loop_backing_files() -> list[tuple[str, str]]:
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                name = f.read().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        found.append(("/dev/" + backing.split("/")[3], name))
    return found


def loops_for(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (a resolved path; read from /sys)."""
    return sorted(loop for loop, name in _loop_backing_files() if name == path)


def loops_under(directory: str) -> list[str]:
    """Loop devices whose backing file lies under ``directory`` (a resolved path)."""
    root = directory.rstrip("/") + "/"
    return sorted(loop for loop, name in _loop_backing_files() if name.startswith(root))


def wait_detached(path: str, timeout: float = 10.0) -> list[str]:
    """After ``losetup -d`` the loop driver lets go of its file asynchronously.
    Waits until no loop device holds ``path``; returns those that still do."""
    deadline = time.monotonic() + timeout
    while (left := loops_for(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def loop_dio(device: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = 232  # sizeof(struct loop_info64)


def loop_backing_device(loop: str) -> str | None:
    """``major:minor`` of the filesystem holding the file a loop device is attached to (its
    ``lo_device``), asked of the driver (LOOP_GET_STATUS64: nothing is read from the device),
    or None if it cannot tell."""
    import fcntl

    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = bytearray(_LOOP_INFO64)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError:
        return None
    finally:
        os.close(fd)
    dev = int.from_bytes(info[:8], "little")
    return f"{os.major(dev)}:{os.minor(dev)}"
