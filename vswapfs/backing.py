"""The backing file: every page's guaranteed home when the store refuses it."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat

import trio

from hoststore.protocol import PAGE_SIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
HUGETLBFS_MAGIC = 0x958458F6
OVERLAYFS_MAGIC = 0x794C7630
FUSE_MAGIC = 0x65735546
# Filesystems whose pages live in RAM: never a backing file (swapoff hangs for good).
_RAM_FS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs", HUGETLBFS_MAGIC: "hugetlbfs"}
# Filesystems that may sit on RAM (an overlay on tmpfs, a FUSE filesystem serving
# from memory): refused unless the user says they do not (--allow-backing-fs).
_MAYBE_RAM_FS = {OVERLAYFS_MAGIC: "overlay", FUSE_MAGIC: "fuse"}
READ_THREADS = WRITE_THREADS = 4

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


def check_location(path: str, mountpoint: str | None, allow_fs: frozenset[str] = frozenset()) -> None:
    """Refuse a backing file on tmpfs/ramfs (or overlay/FUSE, unless allowed) or
    inside our own mount.

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
        magic = fs_type(real_dir)
    except OSError as exc:
        raise BackingError(f"cannot check the filesystem of {directory}: {exc.strerror}") from None
    kind = _RAM_FS.get(magic)
    if kind:
        raise BackingError(
            f"backing file {path} is on {kind}: its pages could be swapped to the device they back, "
            "and swapoff would hang for good; put it on a disk filesystem"
        )
    kind = _MAYBE_RAM_FS.get(magic)
    if kind and kind not in allow_fs:
        raise BackingError(
            f"backing file {path} is on {kind}, which may keep its data in RAM (and then swapoff can hang "
            f"for good); put it on a disk filesystem, or pass --allow-backing-fs {kind} if this one is on disk"
        )


class Backing:
    """An open, locked backing file of ``size`` bytes (a multiple of the page size).

    Its I/O runs off the event loop: writes and hole punches in a few worker
    threads, reads inline only when the page cache has the data (``RWF_NOWAIT``)
    and in a worker thread otherwise, so a slow disk delays only the requests
    that need it.
    """

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.punch_supported = True
        self.nowait_reads = True
        self._write_threads = trio.CapacityLimiter(WRITE_THREADS)
        self._read_threads = trio.CapacityLimiter(READ_THREADS)

    @classmethod
    def open(cls, path: str, size: int | None, mountpoint: str | None = None,
             allow_fs: frozenset[str] = frozenset()) -> "Backing":
        """Open ``path``, creating it preallocated with mode 0600 when missing, and lock it.

        An existing file keeps its size (``size``, if given, must match) and is
        allocated in full, so that a refused page can never meet ENOSPC.  A
        symlink is refused, as is a file another vswapfs holds.
        """
        check_location(path, mountpoint, allow_fs)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
            created = False
        except FileNotFoundError:
            if size is None:
                raise BackingError(f"backing file {path} does not exist: give --size to create it") from None
            _check_size(size, path)
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise BackingError(f"cannot create backing file {path}: {exc.strerror}") from None
            created = True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BackingError(f"backing file {path} is a symlink: give the real path") from None
            raise BackingError(f"cannot open backing file {path}: {exc.strerror}") from None
        try:
            _lock(fd, path)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackingError(f"backing file {path} is not a regular file")
            actual = size if created else st.st_size
            if not created and size is not None and size != actual:
                raise BackingError(f"backing file {path} has {actual} bytes but the size asked for is {size}")
            _check_size(actual, path)  # type: ignore[arg-type]
            _preallocate(fd, actual, path)  # type: ignore[arg-type]
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)
            raise
        return cls(fd, actual, path)  # type: ignore[arg-type]

    # -- synchronous (worker threads, and tests) -------------------------------------

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pwrite_many(self, parts: list[tuple[int, memoryview]]) -> None:
        for offset, data in parts:
            self.pwrite(offset, data)

    def pread_into(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < len(out):
            n = os.preadv(self.fd, [out[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "backing file shorter than expected", self.path)
            done += n

    def punch_sync(self, offset: int, length: int) -> bool:
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

    # -- async, off the event loop ----------------------------------------------------

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await trio.to_thread.run_sync(self.pwrite, offset, data, limiter=self._write_threads)

    async def write_many(self, parts: list[tuple[int, memoryview]]) -> None:
        """Several scattered writes in one trip to a worker thread."""
        await trio.to_thread.run_sync(self.pwrite_many, parts, limiter=self._write_threads)

    async def read_into(self, offset: int, out: memoryview) -> None:
        done = self._read_cached(offset, out) if self.nowait_reads else 0
        if done < len(out):
            await trio.to_thread.run_sync(self.pread_into, offset + done, out[done:], limiter=self._read_threads)

    def _read_cached(self, offset: int, out: memoryview) -> int:
        """Read what the page cache holds without blocking; how many bytes that was."""
        done = 0
        while done < len(out):
            try:
                n = os.preadv(self.fd, [out[done:]], offset + done, os.RWF_NOWAIT)
            except BlockingIOError:
                return done
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.nowait_reads = False
                    return done
                raise
            if n == 0:
                raise OSError(errno.EIO, "backing file shorter than expected", self.path)
            done += n
        return done

    async def punch(self, offset: int, length: int) -> bool:
        if not self.punch_supported:
            return False
        return await trio.to_thread.run_sync(self.punch_sync, offset, length, limiter=self._write_threads)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the lock
            self.fd = -1


def _lock(fd: int, path: str) -> None:
    """An exclusive lock for the file's lifetime: one device per backing file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BackingError(f"backing file {path} is in use by another vswapfs (it is locked)") from None


def _check_size(size: int, path: str) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise BackingError(f"size of {path} ({size}) is not a positive multiple of {PAGE_SIZE}")


def _preallocate(fd: int, size: int, path: str) -> None:
    """Allocate every block (holes included: a discard punches them), so that
    writing a refused page never needs space the filesystem may not have."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise BackingError(f"cannot allocate {size} bytes for {path}: {exc.strerror}") from None
