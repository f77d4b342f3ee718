"""Which byte ranges of a file are not yet written blocks (FIEMAP).

An O_DIRECT overwrite of a *written* extent changes no metadata: no block is
allocated and no extent is converted, so it never starts a journal transaction.
A hole, an unwritten extent (what ``fallocate`` leaves), a delayed allocation or
a shared (reflinked) extent all need one on their first write, and a journal
transaction allocates memory: on the swap-out path, under machine-wide memory
pressure, that is a deadlock (see docs/pressure.md).  The backing file is
therefore written in full once, where this module says it is not.
"""

from __future__ import annotations

import errno
import fcntl
import struct

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1  # flush delayed allocations first, so they show as real extents
FIEMAP_EXTENT_LAST = 0x1
# Extents whose next write still changes metadata.
NEEDS_WRITE = (
    0x2  # UNKNOWN: location not known yet
    | 0x4  # DELALLOC
    | 0x8  # ENCODED (compressed): rewritten elsewhere
    | 0x200  # DATA_INLINE
    | 0x400  # DATA_TAIL
    | 0x800  # UNWRITTEN: allocated by fallocate, converted on first write
    | 0x2000  # SHARED: a write copies it first
)
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
BATCH = 256  # extents asked for per call


class FiemapUnsupported(Exception):
    """This filesystem does not say where a file's blocks are."""


def _call(fd: int, start: int, length: int) -> list[tuple[int, int, int]]:
    buf = bytearray(_HEADER.size + BATCH * _EXTENT.size)
    _HEADER.pack_into(buf, 0, start, length, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise FiemapUnsupported(exc.strerror) from None
        raise
    mapped = _HEADER.unpack_from(buf, 0)[3]
    found = []
    for i in range(mapped):
        logical, _physical, length, flags = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
        found.append((logical, length, flags))
    return found


def extents(fd: int, size: int) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of every extent in ``0 .. size``, in order."""
    found: list[tuple[int, int, int]] = []
    start = 0
    while start < size:
        batch = _call(fd, start, size - start)
        if not batch:
            break
        found.extend(batch)
        logical, length, flags = batch[-1]
        if flags & FIEMAP_EXTENT_LAST:
            break
        start = logical + length
    return found


def unwritten_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every range in ``0 .. size`` that is not a written,
    unshared block: holes, and extents whose first write would change metadata.
    FiemapUnsupported where the filesystem cannot say."""
    todo: list[tuple[int, int]] = []
    at = 0
    for logical, length, flags in extents(fd, size):
        end = min(logical + length, size)
        if logical > at:
            todo.append((at, logical - at))  # a hole
        if flags & NEEDS_WRITE and end > max(logical, at):
            todo.append((max(logical, at), end - max(logical, at)))
        at = max(at, end)
    if at < size:
        todo.append((at, size - at))
    return _merge(todo)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] >= start:
            first, first_length = merged[-1]
            merged[-1] = (first, max(first_length, start + length - first))
        else:
            merged.append((start, length))
    return merged
