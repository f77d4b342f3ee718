"""pyfuse3 Operations: LOWER's tree passed through, file data through the page cache.

Names, attributes and directories go straight to LOWER (``fscache.tree``); reads go
to :class:`~fscache.pagecache.PageCache`, and every change to a file's data is made
inside :meth:`~fscache.pagecache.PageCache.changing`, so the cache forgets what the
change touches before it is answered.  Blocking calls on LOWER run in worker threads.
Exceptions become errno values in one place, :func:`fuse_errors`: LOWER's own errors
pass through as they are; anything else is EIO, counted and logged.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from vswapcommon.sizes import PAGE_SIZE

from .counters import CacheCounter
from .lowerfile import Identity, PageReader, generation, identity, of_status
from .pagecache import CachedFile, PageCache
from .tree import Node, Tree

log = logging.getLogger("fscache.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20
_SHIFTS = FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE  # modes that move data after the range
_libc = ctypes.CDLL(None, use_errno=True)
_io = trio.to_thread.run_sync


def fuse_errors(method: F) -> F:
    """Let only FUSEError out of a handler: an exception escaping one would end the mount."""

    @functools.wraps(method)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno:
                raise pyfuse3.FUSEError(exc.errno) from None  # LOWER's own answer
            self._failed(method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - the one place exceptions become errno values
            self._failed(method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _libc_call(result: int) -> None:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def entry(node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
    """LOWER's status as the kernel is told it.  No timeouts: the kernel asks again each
    time, so a change made to LOWER directly is seen at once."""
    attr = pyfuse3.EntryAttributes()
    for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                 "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        setattr(attr, name, getattr(st, name))
    attr.st_ino = node.inode
    attr.entry_timeout = 0
    attr.attr_timeout = 0
    return attr


@dataclass(slots=True)
class Handle:
    """An open file: its LOWER descriptor, and for regular files the cache's record of it."""

    fd: int
    node: Node
    cached: CachedFile | None
    append: bool
    reader: PageReader | None = None

    def close(self) -> None:
        os.close(self.fd)
        if self.reader is not None:
            self.reader.close()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_splice_read = False

    def __init__(self, lower: str, cache: PageCache) -> None:
        super().__init__()
        self.tree = Tree(lower)
        self.cache = cache
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[bytes]] = {}
        self._next_fh = 1
        self._root = os.geteuid() == 0

    def _failed(self, what: str) -> None:
        try:
            self.cache.counters.add(CacheCounter.IO_ERRORS)
            log.exception("%s failed", what)
        except Exception:  # noqa: BLE001, S110 - counting or logging failed: the errno still goes out
            pass

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- names -------------------------------------------------------------------------

    async def _learn(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        fd, st = await _io(self.tree.open_entry, parent, name)
        return entry(self.tree.learn(fd, st), st)

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._learn(self.tree[parent_inode], name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            try:
                self.tree.forget(inode, n)
            except OSError:  # noqa: PERF203 - forget must not raise
                log.exception("forget %d", inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self.tree[inode]
        return entry(node, await _io(os.fstat, node.fd))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.tree[inode]
        buf = ctypes.create_string_buffer(4096)
        n = _libc.readlinkat(node.fd, b"", buf, 4096)
        _libc_call(n)
        return buf.raw[:n]

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await _io(os.statvfs, self.tree[pyfuse3.ROOT_INODE].path)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    # -- directories -------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.tree[inode]

        def names() -> list[bytes]:
            return sorted(os.listdir(os.fsencode(node.path)))

        fh = self._fh()
        self.dirs[fh] = await _io(names)
        self.handles[fh] = Handle(-1, node, None, False)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """The names as they were at opendir, in order: a position is an index into them."""
        parent = self.handles[fh].node
        names = self.dirs[fh]
        for index in range(start_id, len(names)):
            try:
                fd, st = await _io(self.tree.open_entry, parent, names[index])
            except FileNotFoundError:
                continue  # gone since opendir
            node = self.tree.learn(fd, st)
            if not pyfuse3.readdir_reply(token, names[index], entry(node, st), index + 1):
                self.tree.forget(node.inode, 1)
                return

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)
        self.handles.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self.handles[fh].node

        def sync() -> None:
            fd = os.open(node.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await _io(sync)

    async def _owned(self, parent: Node, name: bytes, ctx: Any) -> None:
        """A new entry belongs to whoever asked for it, not to this daemon (a setgid
        directory's group stays, as LOWER gave it)."""
        if not self._root:
            return
        gid = -1 if (await _io(os.fstat, parent.fd)).st_mode & stat.S_ISGID else ctx.gid
        await _io(lambda: os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        await _io(lambda: os.mkdir(name, mode & ~ctx.umask, dir_fd=parent.fd))
        await self._owned(parent, name, ctx)
        return await self._learn(parent, name)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        await _io(lambda: os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=parent.fd))
        await self._owned(parent, name, ctx)
        return await self._learn(parent, name)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        await _io(lambda: os.symlink(target, name, dir_fd=parent.fd))
        await self._owned(parent, name, ctx)
        return await self._learn(parent, name)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node, parent = self.tree[inode], self.tree[new_parent_inode]
        async with self._touching(await _io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            await _io(lambda: os.link(node.path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True))
        return await self._learn(parent, new_name)

    async def _victim(self, parent: Node, name: bytes) -> os.stat_result | None:
        """The status of the entry a removal or rename is about to take away, if any."""
        try:
            return await _io(lambda: os.stat(name, dir_fd=parent.fd, follow_symlinks=False))
        except FileNotFoundError:
            return None

    async def _maybe_gone(self, st: os.stat_result | None) -> None:
        """After a name went away: if it was a regular file's last name, the cache forgets it."""
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_dev, st.st_ino)
        node = self.tree.find(key)
        links = (await _io(os.fstat, node.fd)).st_nlink if node is not None else st.st_nlink - 1
        if links <= 0:
            self.cache.gone(key)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self.tree[parent_inode]
        victim = await self._victim(parent, name)
        node = self.tree.find((victim.st_dev, victim.st_ino)) if victim is not None else None
        # A file with more names keeps its pages: its ctime moves, through the mount.
        status = (lambda: os.fstat(node.fd)) if node is not None else (lambda: victim)
        async with self._touching(victim if node is not None else None, status):
            await _io(lambda: os.unlink(name, dir_fd=parent.fd))
        await self._maybe_gone(victim)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self.tree[parent_inode]
        await _io(lambda: os.rmdir(name, dir_fd=parent.fd))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        old, new = self.tree[parent_inode_old], self.tree[parent_inode_new]
        moved = await self._victim(old, name_old)
        victim = await self._victim(new, name_new)
        async with self._touching(moved, lambda: os.stat(name_new, dir_fd=new.fd, follow_symlinks=False)):
            if flags:
                await _io(lambda: _libc_call(_libc.renameat2(old.fd, name_old, new.fd, name_new, flags)))
            else:
                await _io(lambda: os.rename(name_old, name_new, src_dir_fd=old.fd, dst_dir_fd=new.fd))
        if victim is not None and moved is not None and (victim.st_dev, victim.st_ino) != (moved.st_dev, moved.st_ino) \
                and not flags & pyfuse3.RENAME_EXCHANGE:
            await self._maybe_gone(victim)

    # -- attributes -----------------------------------------------------------------------

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.tree[inode]
        path = node.path
        if fields.update_size:
            await self._truncate(node, self.handles.get(fh) if fh is not None else None, attr.st_size)
        async with self._touching(await _io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            if fields.update_mode and not node.is_symlink:
                await _io(os.chmod, path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                await _io(os.chown, path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                await _io(self._utime, node, attr, fields)
        return entry(node, await _io(os.fstat, node.fd))

    @staticmethod
    def _utime(node: Node, attr: Any, fields: Any) -> None:
        st = os.fstat(node.fd)
        atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        os.utime(node.path, ns=(atime, mtime))  # through /proc: a symlink's own times

    async def _truncate(self, node: Node, handle: Handle | None, size: int) -> None:
        if handle is not None and handle.fd >= 0:
            fd, close = handle.fd, False
        else:
            fd, close = await _io(os.open, node.path, os.O_WRONLY | os.O_CLOEXEC), True
        try:
            cached = self.cache.files.get(node.key)
            if cached is None:
                await _io(os.ftruncate, fd, size)
                return
            async with self.cache.changing(cached, size // PAGE_SIZE, None, now=self._now(fd, cached)):
                await _io(os.ftruncate, fd, size)
        finally:
            if close:
                os.close(fd)

    # -- extended attributes ----------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await _io(os.getxattr, self.tree[inode].path, name)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await _io(os.setxattr, self.tree[inode].path, name, value)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in await _io(os.listxattr, self.tree[inode].path)]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await _io(os.removexattr, self.tree[inode].path, name)

    # -- files --------------------------------------------------------------------------

    def _now(self, fd: int, cached: CachedFile) -> Callable[[], Identity]:
        gen = cached.ident.generation
        return lambda: identity(fd, gen)

    @asynccontextmanager
    async def _touching(self, st: os.stat_result | None, status: Callable[[], os.stat_result]) -> AsyncIterator[None]:
        """Around a change through the mount to a file's metadata only (its mode, owner,
        times, names: its ctime moves), so that the cache does not take it for a change
        behind the mount's back at the next open.  ``st``: the file's status just before;
        ``status()``: its status after."""
        cached = self.cache.files.get((st.st_dev, st.st_ino)) if st is not None else None
        if cached is None:
            yield
            return
        gen = cached.ident.generation
        async with self.cache.changing(cached, 0, 0, now=lambda: of_status(status(), gen),
                                       before=of_status(st, gen)):
            yield

    async def _opened(self, node: Node, fd: int, flags: int) -> pyfuse3.FileInfo:
        """A handle on ``fd``; for a regular file, the cache checks it is the file it knew."""
        cached, same = None, False
        if stat.S_ISREG(node.mode):
            ident = await _io(lambda: identity(fd, generation(fd)))
            cached, same = self.cache.opened(ident)
        fh = self._fh()
        self.handles[fh] = Handle(fd, node, cached, bool(flags & os.O_APPEND))
        # The kernel keeps what it cached of the file only if the file is as the cache knew it.
        return pyfuse3.FileInfo(fh=fh, keep_cache=same)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.tree[inode]
        # Through /proc: the node is the file already (O_NOFOLLOW would refuse the /proc link itself).
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW)
        fd = await _io(os.open, node.path, flags | os.O_CLOEXEC)
        try:
            return await self._opened(node, fd, flags)
        except BaseException:
            os.close(fd)
            raise

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.tree[parent_inode]
        fd = await _io(lambda: os.open(name, flags | os.O_CREAT | os.O_CLOEXEC, mode & ~ctx.umask,
                                       dir_fd=parent.fd))
        try:
            await self._owned(parent, name, ctx)
            attr = await self._learn(parent, name)
            return await self._opened(self.tree[attr.st_ino], fd, flags), attr
        except BaseException:
            os.close(fd)
            raise

    async def _lower_reader(self, handle: Handle) -> PageReader:
        if handle.reader is None:
            handle.reader = await _io(PageReader, f"/proc/self/fd/{handle.fd}")
        return handle.reader

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if handle.cached is None:
            return await _io(os.pread, handle.fd, size, off)
        reader = await self._lower_reader(handle)
        return await self.cache.read(handle.cached, lambda first, n: _io(reader.read, first, n), off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        cached = handle.cached
        if cached is None:
            return await _io(os.pwrite, handle.fd, buf, off)
        self.cache.counters.add(CacheCounter.WRITE_REQUESTS)
        first = off // PAGE_SIZE
        count: int | None = -(-(off + len(buf)) // PAGE_SIZE) - first
        if handle.append:  # the data lands at LOWER's end, wherever that is now
            first, count = min(off, (await _io(os.fstat, handle.fd)).st_size) // PAGE_SIZE, None
        async with self.cache.changing(cached, first, count, now=self._now(handle.fd, cached)):
            written = await _io(os.pwrite, handle.fd, buf, off)
        self.cache.counters.add(CacheCounter.LOWER_PAGES_WRITTEN,
                                -(-(off + written) // PAGE_SIZE) - off // PAGE_SIZE if written else 0)
        return written

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.handles[fh]

        def allocate() -> None:
            _libc_call(_libc.fallocate(handle.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)))

        if handle.cached is None:
            return await _io(allocate)
        first = offset // PAGE_SIZE
        count = None if mode & _SHIFTS else -(-(offset + length) // PAGE_SIZE) - first
        async with self.cache.changing(handle.cached, first, count, now=self._now(handle.fd, handle.cached)):
            await _io(allocate)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await _io(os.fdatasync if datasync else os.fsync, self.handles[fh].fd)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        handle.close()
        if handle.cached is not None:
            self.cache.closed(handle.cached)

    def close(self) -> None:
        for handle in self.handles.values():
            if handle.fd >= 0:
                handle.close()
        self.handles.clear()
        self.tree.close()
