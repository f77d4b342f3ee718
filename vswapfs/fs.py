"""pyfuse3 Operations: one directory holding the swap file and a read-only stats file.

This class only translates FUSE calls into :class:`~vswapfs.pager.Pager`
calls; the page rules live there.  Exceptions become errno values in one
place, :func:`fuse_errors`, so only ``pyfuse3.FUSEError`` leaves a handler.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from .pager import Pager, PagerCounter, PagerError

log = logging.getLogger("vswapfs.fs")

SWAP_NAME = b"swap"
STATS_NAME = b"stats"
ROOT_INODE = pyfuse3.ROOT_INODE
SWAP_INODE = ROOT_INODE + 1
STATS_INODE = ROOT_INODE + 2
_FILES = {SWAP_NAME: SWAP_INODE, STATS_NAME: STATS_INODE}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# pyfuse3 routes fallocate to Operations only with patches/pyfuse3-*-fallocate.patch;
# without it libfuse answers ENOSYS and the loop driver turns discard off.
DISCARD_SUPPORTED = hasattr(pyfuse3.Operations, "fallocate")
# libfuse reads requests with splice(2) unless told not to, which pyfuse3 allows only
# with patches/pyfuse3-*-splice.patch: each splice makes the kernel allocate, on the
# swap path (docs/pressure.md, cycle 4).
SPLICE_READ_CAN_BE_OFF = hasattr(pyfuse3.Operations, "enable_splice_read")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE  # what the loop driver sends for a discard


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE caller sees for ``exc``."""
    if isinstance(exc, PagerError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(method: F) -> F:
    """Let only FUSEError out of a handler; count and log everything else.

    An exception escaping a handler would end pyfuse3's main loop, and with it
    every page of the device: nothing in here may raise anything but FUSEError."""

    @functools.wraps(method)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become errno values
            code = errno_for(exc)
            try:
                self.pager.counters.add(PagerCounter.IO_ERRORS)
                if isinstance(exc, PagerError):
                    log.debug("%s: %s", method.__name__, exc)
                else:
                    log.exception("%s failed", method.__name__)
            except Exception:  # noqa: BLE001, S110 - counting or logging failed: the errno still goes out
                pass
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_splice_read = False  # requests read into a buffer made once (SPLICE_READ_CAN_BE_OFF)

    def __init__(self, pager: Pager, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.pager = pager
        self.stats = stats or pager.stats
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._mtime_ns = time.time_ns()
        self.swap_opens = 0
        self._stats_files: dict[int, bytes] = {}
        self._next_fh = 1

    # -- names and attributes ---------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == SWAP_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_size = self.pager.size
            attr.st_nlink = 1
        elif inode == STATS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_ino = inode
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        attr.entry_timeout = 300
        attr.attr_timeout = 300
        return attr

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT_INODE)
        inode = _FILES.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size and inode == SWAP_INODE and attr.st_size != self.pager.size:
            raise pyfuse3.FUSEError(errno.EINVAL)  # the device size is the backing file's
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = list(_FILES.items())
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                break

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        # The loop driver offers discard only if statfs works on the file.
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = self.pager.npages
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(_FILES) + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- files --------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == SWAP_INODE:
            if flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EINVAL)
            self.swap_opens += 1
            # direct_io: every read and write reaches the pager; the kernel
            # must not cache swap pages in our page cache.
            return pyfuse3.FileInfo(fh=0, direct_io=True, keep_cache=False)
        if inode == STATS_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            fh = self._next_fh
            self._next_fh += 1
            self._stats_files[fh] = (json.dumps(self.stats(), indent=1, sort_keys=True) + "\n").encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == 0:
            return await self.pager.read(off, size)
        return self._stats_files[fh][off : off + size]

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh != 0:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.pager.write(off, buf)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """PUNCH_HOLE | KEEP_SIZE is a discard (a freed swap slot); the file is
        fully allocated and cannot grow, so no other mode means anything here."""
        if fh != 0:
            raise pyfuse3.FUSEError(errno.EBADF)
        if mode != PUNCH_HOLE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        await self.pager.discard(offset, length)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        # Swap needs no durability across reboots; refused pages are already in the backing file.
        return None

    @fuse_errors
    async def release(self, fh: int) -> None:
        if fh == 0:
            self.swap_opens -= 1
        else:
            self._stats_files.pop(fh, None)
