"""LOWER's files as the cache sees them: who a file is, and its pages read without LOWER's page cache.

A file's identity is its device and inode number, the inode's generation where the
filesystem gives one, and its size, mtime and ctime: when any of these differ from
what the cache saw last, the file changed behind the mount's back (or a new file
reuses the inode) and its cached pages are forgotten.  Timestamps are as fine as the
filesystem keeps them (many kernels: one clock tick), so a change behind the mount's
back that keeps the size and lands within the same tick as the cache's last look
cannot be told apart; docs/fscache.md says so.

Pages are read with ``O_DIRECT`` where the filesystem allows it, so LOWER's own page
cache does not hold a second copy of what the mount's page cache and the store hold;
elsewhere (tmpfs, some FUSE filesystems) with ordinary reads followed by
``posix_fadvise(DONTNEED)``.  Reads run in a worker thread: a slow disk holds up the
read that waits for it, not the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

from vswapcommon.sizes import PAGE_SIZE

FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation (ext4, xfs, btrfs, ...)


@dataclass(frozen=True, slots=True)
class Identity:
    dev: int
    ino: int
    generation: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.ino


def generation(fd: int) -> int:
    """The inode's generation, or 0 where the filesystem has none to give."""
    try:
        return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8))[0]
    except OSError:
        return 0


def identity(fd: int, gen: int | None = None) -> Identity:
    """The identity of the file open at ``fd`` now (``gen``: its generation, if known)."""
    return of_status(os.fstat(fd), generation(fd) if gen is None else gen)


def of_status(st: os.stat_result, gen: int) -> Identity:
    return Identity(st.st_dev, st.st_ino, gen, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PageReader:
    """Whole pages of one LOWER file, read around LOWER's page cache."""

    def __init__(self, path: str) -> None:
        """``path`` names the file (a ``/proc/self/fd/N`` path does)."""
        self.direct = True
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, first: int, count: int) -> bytes:
        """Pages ``first .. first + count`` (short at the end of the file).  Blocking: run it
        in a worker thread."""
        offset, length = first * PAGE_SIZE, count * PAGE_SIZE
        if self.direct:
            buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs
            try:
                got = os.preadv(self.fd, [buf], offset)
                return buf[:got]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Opened, but the filesystem refuses direct reads after all: plain reads from now on.
                self.direct = False
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            finally:
                buf.close()
        data = os.pread(self.fd, length, offset)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
