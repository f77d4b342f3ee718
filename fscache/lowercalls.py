"""The system calls on LOWER that Python's ``os`` does not offer as fscache needs them.

All of them block: call them from a worker thread.  Each raises OSError with the
call's errno, which the filesystem passes on as LOWER's own answer.
"""

from __future__ import annotations

import ctypes
import os
import stat

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def readlink(fd: int) -> bytes:
    """The target of the symlink an O_PATH descriptor holds."""
    buf = ctypes.create_string_buffer(4096)
    n = _check(_libc.readlinkat(fd, b"", buf, 4096))
    return buf.raw[:n]


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown what an O_PATH descriptor holds, itself (a symlink too, never its target)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def set_times(path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times given, leave the other as it is (``UTIME_OMIT``: no read-then-write
    that could undo a concurrent change).  ``path`` is a /proc/self/fd link: followed, it
    lands on the very inode, a symlink's own too."""
    times = (_Timespec * 2)()
    for i, ns in enumerate((atime_ns, mtime_ns)):
        times[i] = _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(*divmod(ns, 10**9))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)))


def rename(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    if flags:
        _check(_libc.renameat2(old_dir, old, new_dir, new, flags))
    else:
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)


def claim(parent: int, name: bytes, kind: int, uid: int, gid: int) -> tuple[int, os.stat_result]:
    """An entry this daemon just made in ``parent`` (of type ``kind``, an S_IFMT value),
    given to ``uid``/``gid`` (-1: left as is): an O_PATH descriptor of it and its status.
    Refused (EEXIST) if what now has that name is not such an entry of ours: someone
    replaced it meanwhile, and it is not ours to give away."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        st = os.fstat(fd)
        if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid():
            raise FileExistsError(17, f"{name!r} was replaced while it was being made")
        if uid != -1 or gid != -1:
            chown_fd(fd, uid, gid)
            st = os.fstat(fd)
        return fd, st
    except BaseException:
        os.close(fd)
        raise
