"""The backing file: every page's guaranteed home when the store refuses it."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat

from hoststore.protocol import PAGE_SIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_FORBIDDEN_FS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

log = logging.getLogger("vswapfs.backing")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BackingError(Exception):
    """The backing file cannot be used; the message says why."""


def fs_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path`` (os.statvfs does not report it)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_location(path: str, mountpoint: str | None) -> None:
    """Refuse a backing file on tmpfs/ramfs or inside our own mount.

    A tmpfs page can be swapped out to the very device it backs; swapoff then
    hangs in D state for good (seen on these machines).  A backing file inside
    the vswapfs mount would be served by the daemon it is meant to back.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    real_dir = os.path.realpath(directory)
    if mountpoint is not None:
        real_mnt = os.path.realpath(mountpoint)
        if real_dir == real_mnt or real_dir.startswith(real_mnt.rstrip("/") + "/"):
            raise BackingError(f"backing file {path} is inside the vswapfs mount {mountpoint}")
    try:
        kind = _FORBIDDEN_FS.get(fs_type(real_dir))
    except OSError as exc:
        raise BackingError(f"cannot check the filesystem of {directory}: {exc.strerror}") from None
    if kind:
        raise BackingError(
            f"backing file {path} is on {kind}: its pages could be swapped to the device they back, "
            "and swapoff would hang for good; put it on a disk filesystem"
        )


class Backing:
    """An open backing file of ``size`` bytes (a multiple of the page size)."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.punch_supported = True

    @classmethod
    def open(cls, path: str, size: int | None, mountpoint: str | None = None) -> "Backing":
        """Open ``path``, creating it preallocated with mode 0600 when missing.

        An existing file keeps its size; ``size``, if given, must then match it.
        """
        check_location(path, mountpoint)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            created = False
        except FileNotFoundError:
            if size is None:
                raise BackingError(f"backing file {path} does not exist: give --size to create it") from None
            _check_size(size, path)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise BackingError(f"cannot create backing file {path}: {exc.strerror}") from None
            created = True
        except OSError as exc:
            raise BackingError(f"cannot open backing file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackingError(f"backing file {path} is not a regular file")
            if created:
                _preallocate(fd, size, path)  # type: ignore[arg-type]
                actual = size
            else:
                actual = st.st_size
                if size is not None and size != actual:
                    raise BackingError(
                        f"backing file {path} has {actual} bytes but the size asked for is {size}"
                    )
                _check_size(actual, path)
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)
            raise
        return cls(fd, actual, path)  # type: ignore[arg-type]

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pread_into(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < len(out):
            n = os.preadv(self.fd, [out[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "backing file shorter than expected", self.path)
            done += n

    def punch(self, offset: int, length: int) -> bool:
        """Release the blocks of a discarded range; False if the filesystem cannot
        (the range then just keeps its blocks: nothing is lost either way)."""
        if not self.punch_supported:
            return False
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.punch_supported = False
            log.warning("%s: cannot punch holes (%s): discarded pages keep their blocks", self.path, exc.strerror)
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_size(size: int, path: str) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise BackingError(f"size of {path} ({size}) is not a positive multiple of {PAGE_SIZE}")


def _preallocate(fd: int, size: int, path: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise BackingError(f"cannot preallocate {size} bytes for {path}: {exc.strerror}") from None
