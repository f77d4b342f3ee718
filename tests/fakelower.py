"""LOWER for cache tests: files in memory, with identities that move as a real filesystem's do.

Each change bumps the file's mtime and ctime (a clock of its own, never the same
twice: the tests are about what the cache does with a change it can see; the
coarse-timestamp blind spot is documented, not tested).  ``replace`` gives an inode
number to a new file with a new generation, as a filesystem reusing a freed inode
does.  Changes through the mount go through :func:`change_through`, as
``fscache.fs`` makes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fscache.lowerfile import Identity
from fscache.pagecache import CachedFile, PageCache
from pagewire.messages import PAGE_SIZE


class Lower:
    def __init__(self) -> None:
        self.data: dict[int, bytearray] = {}
        self.gen: dict[int, int] = {}
        self.time: dict[int, int] = {}
        self._clock = 0
        self.reads = 0  # pages read, as the cache asked

    def _tick(self, ino: int) -> None:
        self._clock += 1
        self.time[ino] = self._clock

    def create(self, ino: int, data: bytes = b"") -> None:
        self.data[ino] = bytearray(data)
        self.gen[ino] = self.gen.get(ino, 0) + 1
        self._tick(ino)

    replace = create  # a new file on a reused inode number: a new generation

    def write(self, ino: int, offset: int, data: bytes) -> None:
        buf = self.data[ino]
        if len(buf) < offset:
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        self._tick(ino)

    def truncate(self, ino: int, size: int) -> None:
        buf = self.data[ino]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        self._tick(ino)

    def ident(self, ino: int) -> Identity:
        return Identity(1, ino, self.gen[ino], len(self.data[ino]), self.time[ino], self.time[ino])

    def reader(self, ino: int) -> Any:
        async def read(first: int, count: int) -> bytes:
            await trio.lowlevel.checkpoint()  # as a read in a worker thread lets others run
            self.reads += count
            return bytes(self.data[ino][first * PAGE_SIZE : (first + count) * PAGE_SIZE])

        return read


async def change_through(cache: PageCache, f: CachedFile, lower: Lower, ino: int, offset: int,
                         data: bytes | None = None, truncate: int | None = None,
                         during: Callable[[], Awaitable[None]] | None = None) -> None:
    """A write (``data`` at ``offset``) or a truncate (to ``truncate``) through the mount;
    ``during()`` is awaited inside the change, before LOWER changes (as a slow write lets
    other requests in)."""
    if truncate is not None:
        first, count = truncate // PAGE_SIZE, None
    else:
        assert data is not None
        first = offset // PAGE_SIZE
        count = -(-(offset + len(data)) // PAGE_SIZE) - first
    async with cache.changing(f, first, count, now=lambda: lower.ident(ino)) as change:
        await trio.lowlevel.checkpoint()
        if during is not None:
            await during()
        if truncate is not None:
            lower.truncate(ino, truncate)
            change.size = truncate
        else:
            assert data is not None
            lower.write(ino, offset, data)
            change.size = max(change.before.size, offset + len(data))
