"""pyfuse3 Operations: LOWER's tree passed through, file data through the page cache.

Names, attributes and directories go straight to LOWER (``fscache.tree``); open files
are ``fscache.fileops``'s.  Blocking calls on LOWER run in worker threads; exceptions
become errno values in one place (``fscache.fsbase.fuse_errors``).  Entries made on a
user's behalf are made by this daemon (as root: every user's) and then given to that
user by its descriptor before it gets its name (``lowercalls.make_entry``).
"""

from __future__ import annotations

import os
import stat
from typing import Any

import pyfuse3

from . import lowercalls
from .fileops import FileOps
from .fsbase import Handle, entry, fuse_errors, io, log
from .tree import Node


class Operations(FileOps):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_splice_read = False

    def __init__(self, lower: str, cache: Any) -> None:
        super().__init__(lower, cache)
        self.dirs: dict[int, list[bytes]] = {}

    # -- names -------------------------------------------------------------------------

    async def _learn(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        fd, st = await io(self.tree.open_entry, parent, name)
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
        return entry(node, await io(os.fstat, node.fd))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await io(lowercalls.readlink, self.tree[inode].fd)

    @fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await io(os.statvfs, self.tree[pyfuse3.ROOT_INODE].path)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    # -- directories -------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.tree[inode]
        names = await io(lambda: sorted(os.listdir(os.fsencode(node.path))))
        fh = self._fh()
        self.dirs[fh] = names
        self.handles[fh] = Handle(-1, node)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """The names as they were at opendir, in order: a position is an index into them.
        An entry that cannot be looked at ends this part of the listing (the kernel asks
        for the rest; only an error before any entry is the caller's)."""
        parent = self.handles[fh].node
        names = self.dirs[fh]
        replied = False
        for index in range(start_id, len(names)):
            try:
                fd, st = await io(self.tree.open_entry, parent, names[index])
            except FileNotFoundError:
                continue  # gone since opendir
            except OSError:
                if replied:
                    return
                raise
            node = self.tree.learn(fd, st)
            if not pyfuse3.readdir_reply(token, names[index], entry(node, st), index + 1):
                self.tree.forget(node.inode, 1)
                return
            replied = True

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

        await io(sync)

    async def _made(self, parent: Node, name: bytes, make: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        """An entry made on ``ctx``'s behalf (``make(name)`` makes it): made under a name of
        its own, given to its user, renamed into place (``lowercalls.make_entry``), and
        learnt from the very descriptor given."""
        owner = (ctx.uid, ctx.gid) if self._root else None
        fd, st = await io(lowercalls.make_entry, parent.fd, name, make, owner)
        return entry(self.tree.learn(fd, st), st)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        return await self._made(parent, name, lambda n: os.mkdir(n, mode & ~ctx.umask, dir_fd=parent.fd), ctx)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        return await self._made(parent, name, lambda n: os.mknod(n, mode & ~ctx.umask, rdev, dir_fd=parent.fd), ctx)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.tree[parent_inode]
        return await self._made(parent, name, lambda n: os.symlink(target, n, dir_fd=parent.fd), ctx)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node, parent = self.tree[inode], self.tree[new_parent_inode]
        async with self._touching(await io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            await io(lambda: os.link(node.path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True))
        return await self._learn(parent, new_name)

    async def _status(self, parent: Node, name: bytes) -> os.stat_result | None:
        """The status of the entry a removal or rename is about to touch, if any."""
        try:
            return await io(lambda: os.stat(name, dir_fd=parent.fd, follow_symlinks=False))
        except FileNotFoundError:
            return None

    async def _maybe_gone(self, st: os.stat_result | None) -> None:
        """After a name went away: if it was a regular file's last name, the cache forgets it."""
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_dev, st.st_ino)
        node = self.tree.find(key)
        links = (await io(os.fstat, node.fd)).st_nlink if node is not None else st.st_nlink - 1
        if links <= 0:
            self.cache.gone(key)

    def _after(self, st: os.stat_result | None, otherwise: Any) -> Any:
        """How to look at a file after a change to its names: through the kernel's node of
        it when there is one (whatever its names are then), else ``otherwise``."""
        node = self.tree.find((st.st_dev, st.st_ino)) if st is not None else None
        return (lambda: os.fstat(node.fd)) if node is not None else otherwise

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self.tree[parent_inode]
        victim = await self._status(parent, name)
        # A file with more names keeps its pages: its ctime moves, through the mount.
        async with self._touching(victim, self._after(victim, lambda: victim)):
            await io(lambda: os.unlink(name, dir_fd=parent.fd))
        await self._maybe_gone(victim)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self.tree[parent_inode]
        await io(lambda: os.rmdir(name, dir_fd=parent.fd))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        old, new = self.tree[parent_inode_old], self.tree[parent_inode_new]
        moved = await self._status(old, name_old)
        victim = await self._status(new, name_new)
        after = self._after(moved, lambda: os.stat(name_new, dir_fd=new.fd, follow_symlinks=False))
        async with self._touching(moved, after):
            await io(lowercalls.rename, old.fd, name_old, new.fd, name_new, flags)
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
        async with self._touching(await io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            if fields.update_mode and not node.is_symlink:
                await io(os.chmod, path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                await io(lowercalls.chown_fd, node.fd, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                await io(lowercalls.set_times, path, attr.st_atime_ns if fields.update_atime else None,
                         attr.st_mtime_ns if fields.update_mtime else None)
        return entry(node, await io(os.fstat, node.fd))

    # -- extended attributes ----------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await io(os.getxattr, self.tree[inode].path, name)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        node = self.tree[inode]
        async with self._touching(await io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            await io(os.setxattr, node.path, name, value)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in await io(os.listxattr, self.tree[inode].path)]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        node = self.tree[inode]
        async with self._touching(await io(os.fstat, node.fd), lambda: os.fstat(node.fd)):
            await io(os.removexattr, node.path, name)
