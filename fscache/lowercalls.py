"""The system calls on LOWER that Python's ``os`` does not offer as fscache needs them.

All of them block: call them from a worker thread.  Each raises OSError with the
call's errno, which the filesystem passes on as LOWER's own answer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1


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


def owner_for(parent: int, uid: int, gid: int) -> tuple[int, int]:
    """The owner of a new entry: the caller; a setgid directory's group stays as LOWER gives it."""
    return uid, (-1 if os.fstat(parent).st_mode & stat.S_ISGID else gid)


def _temporary() -> bytes:
    return b".fscache-" + secrets.token_hex(16).encode()


def _into_place(parent: int, temporary: bytes, name: bytes) -> None:
    """Rename without replacing anything (EEXIST if ``name`` is taken).  Where the filesystem
    cannot (EINVAL: no RENAME_NOREPLACE, as on NFS), look, then rename: a name that appears
    between the two would be replaced."""
    try:
        rename(parent, temporary, parent, name, RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        if _exists(parent, name):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        os.rename(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)


def _exists(parent: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _remove(parent: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except IsADirectoryError:
        os.rmdir(name, dir_fd=parent)
    except OSError:
        pass


def make_file(parent: int, name: bytes, flags: int, mode: int,
              owner: tuple[int, int] | None) -> tuple[int, int, os.stat_result]:
    """A new regular file ``name`` in ``parent``, opened with ``flags``: made under a name
    nobody can guess, given to ``owner`` (uid, gid) by its descriptor, then renamed into
    place without replacing anything (FileExistsError if the name was taken meanwhile).
    Returns (descriptor, O_PATH descriptor, status)."""
    temporary = _temporary()
    fd = os.open(temporary, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    placed = False
    try:
        if owner is not None:
            os.fchown(fd, *owner_for(parent, *owner))
        _into_place(parent, temporary, name)
        placed = True
        opath = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        try:
            return fd, opath, os.fstat(opath)
        except BaseException:
            os.close(opath)
            raise
    except BaseException:
        os.close(fd)
        if not placed:
            _remove(parent, temporary)
        raise


def make_entry(parent: int, name: bytes, make: Callable[[bytes], None],
               owner: tuple[int, int] | None) -> tuple[int, os.stat_result]:
    """As :func:`make_file`, for what ``make(temporary_name)`` makes in ``parent`` (a
    directory, a node, a symlink).  Returns (O_PATH descriptor, status)."""
    temporary = _temporary()
    make(temporary)
    placed = False
    try:
        opath = os.open(temporary, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if owner is not None:
                chown_fd(opath, *owner_for(parent, *owner))
            _into_place(parent, temporary, name)
            placed = True
            return opath, os.fstat(opath)
        except BaseException:
            os.close(opath)
            raise
    except BaseException:
        if not placed:
            _remove(parent, temporary)
        raise
