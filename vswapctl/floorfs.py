"""The floor: the least a pyfuse3 server can do to serve a swap file.

One file, ``swap``, whose pages live in this process's memory (an anonymous
mapping, locked: ``vswapcommon.hardening``, as the vswapfs daemons are): a
write copies into it, a read copies out.
No store, no checksum, no page map, no backing file: what is left is the cost
of FUSE and pyfuse3 themselves, with the same mount options and the same
direct I/O as vswapfs.  ``vswapctl bench``'s ``floor`` target runs it, so that
vswapfs's write and read paths are measured against what no pyfuse3 server
can go below.  It is a measuring stick, not a device to keep anything on: its
pages die with it.

    python -m vswapctl.floorfs MOUNTPOINT SIZE
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

from vswapcommon.hardening import harden

log = logging.getLogger("floorfs")

SWAP_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"swap"


class FloorFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.data = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == SWAP_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o600, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_ino, attr.st_blksize = inode, 4096
        attr.entry_timeout = attr.attr_timeout = 300
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(SWAP_INODE)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(SWAP_INODE), 1)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = self.size // 4096
        st.f_namemax = 255
        return st

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != SWAP_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=0, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.data[off : off + len(buf)] = buf
        return len(buf)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit() or int(args[1]) % 4096:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    problems = harden(log)  # its pages must never be swapped out to itself, nor it be OOM-killed
    if any(p.startswith("mlockall") for p in problems):
        print(f"floorfs: cannot lock its memory ({problems}): not safe to swap on", file=sys.stderr)
        return 1
    ops = FloorFS(int(args[1]))
    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floorfs"}
    pyfuse3.init(ops, args[0], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
