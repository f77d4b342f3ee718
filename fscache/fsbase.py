"""What fscache's FUSE operations share: errno in one place, attributes, handles, and the
state both halves (``fscache.fileops``: open files; ``fscache.fs``: names) work on."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .counters import CacheCounter
from .lowerfile import Identity, PageReader, identity, of_status
from .pagecache import CachedFile, PageCache
from .tree import Node, Tree

log = logging.getLogger("fscache.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
io = trio.to_thread.run_sync  # every blocking call on LOWER: a slow LOWER holds up its request alone


def fuse_errors(method: F) -> F:
    """Let only FUSEError out of a handler: an exception escaping one would end the mount.
    LOWER's own errors pass through as they are; anything else is EIO, counted and logged."""

    @functools.wraps(method)
    async def wrapper(self: "Base", *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno:
                raise pyfuse3.FUSEError(exc.errno) from None
            self._failed(method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - the one place exceptions become errno values
            self._failed(method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


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
    """An open file (``fd`` its LOWER descriptor, -1 for a directory); for a regular file
    the cache's record of it, and a reader of LOWER's pages if it may be read."""

    fd: int
    node: Node
    cached: CachedFile | None = None
    append: bool = False
    writable: bool = False
    reader: PageReader | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class Base(pyfuse3.Operations):
    def __init__(self, lower: str, cache: PageCache) -> None:
        super().__init__()
        self.tree = Tree(lower)
        self.cache = cache
        self.handles: dict[int, Handle] = {}
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

    def _now(self, fd: int, cached: CachedFile) -> Callable[[], Identity]:
        """The file's identity now, from a descriptor of it (blocking)."""
        gen = cached.ident.generation
        return lambda: identity(fd, gen)

    @asynccontextmanager
    async def _touching(self, st: os.stat_result | None, status: Callable[[], os.stat_result]) -> AsyncIterator[None]:
        """Around a change through the mount to a file's metadata only (its mode, owner,
        times, names, extended attributes: its ctime moves), so that the cache does not
        take it for a change behind the mount's back.  ``st``: the file's status just
        before; ``status()``: its status after (blocking)."""
        cached = self.cache.files.get((st.st_dev, st.st_ino)) if st is not None else None
        if cached is None or st is None:
            yield
            return
        gen = cached.ident.generation
        async with self.cache.changing(cached, 0, 0, now=lambda: of_status(status(), gen),
                                       before=of_status(st, gen)) as change:
            change.size = st.st_size  # a change of metadata leaves the size as it is
            yield

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
        self.tree.close()
