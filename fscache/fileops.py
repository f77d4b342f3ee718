"""fscache's operations on open files: reads through the page cache, changes inside
:meth:`~fscache.pagecache.PageCache.changing`.

Every change to a regular file's data (a write, a truncate, an ``O_TRUNC`` open,
``fallocate``) is made inside ``changing``, so the cache forgets what it touches before
it reaches LOWER, and so before it is answered.  LOWER descriptors never carry the
caller's ``O_TRUNC`` (done as a truncate, inside ``changing``) or ``O_DIRECT`` (the
kernel's buffers are not aligned for LOWER; the cache reads around LOWER's page cache
anyway).
"""

from __future__ import annotations

import os
import stat
from typing import Any

import pyfuse3

from vswapcommon.sizes import PAGE_SIZE

from . import lowercalls
from .counters import CacheCounter
from .fsbase import Base, Handle, entry, fuse_errors, io
from .lowerfile import PageReader, generation, identity
from .tree import Node

FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20
_SHIFTS = FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE  # modes that move data after the range
_NOT_FOR_LOWER = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_TRUNC | os.O_DIRECT


def _pages(offset: int, length: int) -> tuple[int, int]:
    """The pages ``(first, count)`` bytes ``offset .. offset + length`` touch."""
    first = offset // PAGE_SIZE
    return first, max(0, -(-(offset + length) // PAGE_SIZE) - first)


class FileOps(Base):
    async def _opened(self, node: Node, fd: int, flags: int, truncate: bool) -> pyfuse3.FileInfo:
        """A handle on ``fd``.  For a regular file the cache checks it is the file it knew,
        and a reader of its pages around LOWER's page cache is opened now if it may be
        read (by this daemon, with the rights it has now); ``truncate``: an O_TRUNC open."""
        handle = Handle(fd, node, append=bool(flags & os.O_APPEND))
        same = False
        if stat.S_ISREG(node.mode):
            ident = await io(lambda: identity(fd, generation(fd)))
            handle.cached, same = self.cache.opened(ident)
            if flags & os.O_ACCMODE != os.O_WRONLY:
                try:
                    handle.reader = await io(PageReader, f"/proc/self/fd/{fd}")
                except OSError:
                    pass  # read through the handle itself, uncached
        fh = self._fh()
        self.handles[fh] = handle
        try:
            if truncate and handle.cached is not None:
                await self._truncate(node, handle, 0)
        except BaseException:
            self.handles.pop(fh, None)
            if handle.cached is not None:
                self.cache.closed(handle.cached)
            raise
        # The kernel keeps what it cached of the file only if the file is as the cache knew it.
        return pyfuse3.FileInfo(fh=fh, keep_cache=same and not truncate)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.tree[inode]
        # Through /proc: the node is the file already (O_NOFOLLOW would refuse the /proc link itself).
        fd = await io(os.open, node.path, (flags & ~_NOT_FOR_LOWER) | os.O_CLOEXEC)
        try:
            return await self._opened(node, fd, flags, truncate=bool(flags & os.O_TRUNC))
        except BaseException:
            os.close(fd)
            raise

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new file, made with O_EXCL and O_NOFOLLOW (a name planted in LOWER meanwhile is
        opened as it is if the caller allowed that, never followed, never given away), and
        given to the caller by its descriptor."""
        parent = self.tree[parent_inode]
        lower_flags = (flags & ~_NOT_FOR_LOWER) | os.O_NOFOLLOW | os.O_CLOEXEC
        made = True
        try:
            fd = await io(lambda: os.open(name, lower_flags | os.O_CREAT | os.O_EXCL, mode & ~ctx.umask,
                                          dir_fd=parent.fd))
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            made = False
            fd = await io(lambda: os.open(name, lower_flags, dir_fd=parent.fd))
        try:
            if made and self._root:
                await io(self._give, fd, parent, ctx)
            opath = await io(os.open, f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            st = await io(os.fstat, opath)
            node = self.tree.learn(opath, st)
            try:
                return await self._opened(node, fd, flags, truncate=bool(flags & os.O_TRUNC) and not made), \
                    entry(node, st)
            except BaseException:
                self.tree.forget(node.inode, 1)
                raise
        except BaseException:
            os.close(fd)
            if made:
                await io(_unlink_quietly, parent.fd, name)
            raise

    @staticmethod
    def _give(fd: int, parent: Node, ctx: Any) -> None:
        """A new file belongs to whoever asked for it (a setgid directory's group stays)."""
        gid = -1 if os.fstat(parent.fd).st_mode & stat.S_ISGID else ctx.gid
        os.fchown(fd, ctx.uid, gid)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        reader = handle.reader
        if handle.cached is None or reader is None:
            return await io(os.pread, handle.fd, size, off)
        return await self.cache.read(handle.cached, lambda first, n: io(reader.read, first, n), off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        cached = handle.cached

        if cached is None:
            return await io(os.pwrite, handle.fd, buf, off)
        self.cache.counters.add(CacheCounter.WRITE_REQUESTS)
        first, count = _pages(off, len(buf))
        span: int | None = count
        if handle.append:  # the data lands at LOWER's end, wherever that is now
            first, span = min(off, (await io(os.fstat, handle.fd)).st_size) // PAGE_SIZE, None
        async with self.cache.changing(cached, first, span, now=self._now(handle.fd, cached)):
            written = await io(os.pwrite, handle.fd, buf, off)
        self.cache.counters.add(CacheCounter.LOWER_PAGES_WRITTEN, _pages(off, written)[1])
        return written

    async def _truncate(self, node: Node, handle: Handle | None, size: int) -> None:
        if handle is not None and handle.fd >= 0:
            fd, close = handle.fd, False
        else:
            fd, close = await io(os.open, node.path, os.O_WRONLY | os.O_CLOEXEC), True

        try:
            cached = self.cache.files.get(node.key)
            if cached is None:
                await io(os.ftruncate, fd, size)
                return
            async with self.cache.changing(cached, size // PAGE_SIZE, None, now=self._now(fd, cached)):
                await io(os.ftruncate, fd, size)
        finally:
            if close:
                os.close(fd)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.handles[fh]
        if handle.cached is None:
            return await io(lowercalls.fallocate, handle.fd, mode, offset, length)
        first, count = _pages(offset, length)
        async with self.cache.changing(handle.cached, first, None if mode & _SHIFTS else count,
                                       now=self._now(handle.fd, handle.cached)):
            await io(lowercalls.fallocate, handle.fd, mode, offset, length)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await io(os.fdatasync if datasync else os.fsync, self.handles[fh].fd)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        handle.close()
        if handle.cached is not None:
            self.cache.closed(handle.cached)


def _unlink_quietly(parent: int, name: bytes) -> None:
    """Undo a create that could not be finished (best effort: the name may be gone)."""
    try:
        os.unlink(name, dir_fd=parent)
    except OSError:
        pass
