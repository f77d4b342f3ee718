"""Memory files for page data: made, sealed, and given back by punching holes."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os

from pagewire.sharedmem import SEALS

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14


def sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def populate_write(address: int, length: int) -> int:
    """``madvise(MADV_POPULATE_WRITE)`` on mapped memory: its pages are allocated (and
    locked, under ``mlockall``), their contents unchanged.  0, or the errno it failed with."""
    if _libc.madvise(address, length, MADV_POPULATE_WRITE) == 0:
        return 0
    return ctypes.get_errno()
