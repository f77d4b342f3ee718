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

import errno
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

FALLOC_FL_KEEP_SIZE = 0x01
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
        """A handle on ``fd``, which this takes over (closed if anything fails).  For a
        regular file the cache checks it is the file it knew, and a reader of its pages
        around LOWER's page cache is opened now if it may be read (by this daemon, with the
        rights it has now); ``truncate``: an O_TRUNC open."""
        handle = Handle(fd, node, append=bool(flags & os.O_APPEND), writable=flags & os.O_ACCMODE != os.O_RDONLY)
        try:
            same = False
            if stat.S_ISREG(node.mode):
                ident = await io(lambda: identity(fd, generation(fd)))
                handle.cached, same = self.cache.opened(ident)
                if flags & os.O_ACCMODE != os.O_WRONLY:
                    try:
                        handle.reader = await io(PageReader, f"/proc/self/fd/{fd}")
                    except OSError:
                        pass  # read through the handle itself, uncached
            if truncate:
                await self._truncate(node, handle, 0)
        except BaseException:
            self._release(handle)
            raise
        fh = self._fh()
        self.handles[fh] = handle
        # The kernel keeps what it cached of the file only if the file is as the cache knew it.
        return pyfuse3.FileInfo(fh=fh, keep_cache=same and not truncate)

    def _release(self, handle: Handle) -> None:
        try:
            handle.close()
        finally:
            if handle.cached is not None:
                self.cache.closed(handle.cached)
                handle.cached = None

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.tree[inode]
        # Through /proc: the node is the file already (O_NOFOLLOW would refuse the /proc link itself).
        fd = await io(os.open, node.path, (flags & ~_NOT_FOR_LOWER) | os.O_CLOEXEC)
        return await self._opened(node, fd, flags, truncate=bool(flags & os.O_TRUNC))

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new file, made under a name of its own, given to the caller by its descriptor,
        then renamed into place without replacing anything (``lowercalls.make_file``).  If the
        name appeared in LOWER meanwhile and the caller did not ask for O_EXCL, the file
        there is opened instead, if the caller may (``_open_existing``)."""
        parent = self.tree[parent_inode]
        lower_flags = (flags & ~_NOT_FOR_LOWER) | os.O_CLOEXEC
        owner = (ctx.uid, ctx.gid) if self._root else None
        try:
            fd, opath, st = await io(lowercalls.make_file, parent.fd, name, lower_flags, mode & ~ctx.umask, owner)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, opath, st = await io(_open_existing, parent.fd, name, lower_flags, ctx)
        node = self.tree.learn(opath, st)
        try:
            info = await self._opened(node, fd, flags, truncate=bool(flags & os.O_TRUNC))
        except BaseException:
            self.tree.forget(node.inode, 1)
            raise
        return info, entry(node, st)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            self._release(handle)

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
        async with self.cache.changing(cached, first, span, now=self._now(handle.fd, cached)) as change:
            written = await io(os.pwrite, handle.fd, buf, off)
            change.size = change.before.size + written if handle.append else max(change.before.size, off + written)
        self.cache.counters.add(CacheCounter.LOWER_PAGES_WRITTEN, _pages(off, written)[1])
        return written

    async def _truncate(self, node: Node, handle: Handle | None, size: int) -> None:
        """Truncate LOWER's file to ``size``, inside the cache's change bracket (a record is
        taken for the time of it if no handle holds one: an open meanwhile must find the
        change in progress).  Through the handle's descriptor if it was opened for writing,
        else a descriptor of its own (the kernel checked the caller may write)."""
        if handle is not None and handle.writable:
            fd, close = handle.fd, False
        else:
            fd, close = await io(os.open, node.path, os.O_WRONLY | os.O_CLOEXEC), True
        try:
            cached = handle.cached if handle is not None else None
            held = None
            if cached is None:
                held, _ = self.cache.opened(await io(lambda: identity(fd, generation(fd))))
                cached = held
            try:
                async with self.cache.changing(cached, size // PAGE_SIZE, None, now=self._now(fd, cached)) as change:
                    await io(os.ftruncate, fd, size)
                    change.size = size
            finally:
                if held is not None:
                    self.cache.closed(held)
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
                                       now=self._now(handle.fd, handle.cached)) as change:
            await io(lowercalls.fallocate, handle.fd, mode, offset, length)
            change.size = _size_after_fallocate(change.before.size, mode, offset, length)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await io(os.fdatasync if datasync else os.fsync, self.handles[fh].fd)


def _size_after_fallocate(size: int, mode: int, offset: int, length: int) -> int:
    if mode & FALLOC_FL_COLLAPSE_RANGE:
        return size - length
    if mode & FALLOC_FL_INSERT_RANGE:
        return size + length
    if mode & FALLOC_FL_KEEP_SIZE:
        return size
    return max(size, offset + length)


def _open_existing(parent: int, name: bytes, flags: int, ctx: Any) -> tuple[int, int, os.stat_result]:
    """A create met a file that appeared in LOWER after the kernel found the name free (the
    kernel skips its own permission check for a create): open it only if it is a regular
    file the caller may open so, by its owner's or root's rights; else EEXIST or EACCES.
    Returns (descriptor, O_PATH descriptor, status)."""
    opath = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        st = os.fstat(opath)
        if not stat.S_ISREG(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{name!r} appeared meanwhile, and is not a regular file")
        want = {os.O_RDONLY: stat.S_IRUSR, os.O_WRONLY: stat.S_IWUSR}.get(flags & os.O_ACCMODE,
                                                                         stat.S_IRUSR | stat.S_IWUSR)
        if ctx.uid != 0 and (st.st_uid != ctx.uid or st.st_mode & want != want):
            raise PermissionError(errno.EACCES, f"{name!r} appeared meanwhile, and is not the caller's to open")
        fd = os.open(f"/proc/self/fd/{opath}", flags)  # the very file checked
        return fd, opath, st
    except BaseException:
        os.close(opath)
        raise
