"""The backing file or device: every page's guaranteed home when the store refuses it.

Its writes are on the swap-out path, so they must never wait for memory, nor
for anything that itself waits for memory (docs/pressure.md tells the
deadlocks this avoids, reproduced in a VM under machine-wide pressure):

* **O_DIRECT** I/O: no page cache to allocate, no dirty pages for writeback to
  flush, no dirty throttling.  O_DIRECT needs aligned memory, so every transfer
  goes through a bounce buffer allocated (and locked, with the daemon's
  ``mlockall``) once, at open.
* **Every block written before the first page is served.**  A file is written
  with zeros wherever FIEMAP shows a hole or an extent whose first write would
  change metadata (unwritten, delayed, shared): from then on each write is an
  overwrite in place, with no block allocation and no extent conversion, the
  journal transactions that allocate memory.
* **Never punched.**  A discarded page just leaves the page map; its blocks
  stay, as a swap partition's do.
* A **block device** (the RFC's ``backing_swap``) has no filesystem at all; it
  is opened exclusively (O_EXCL) and checked to hold nothing first.

What the filesystem still does on each write (a time stamp update, which
without the ``lazytime`` mount option is a journal transaction) is named in
:attr:`Backing.pressure_risks`, as is a filesystem this reasoning does not
cover; ``vswapctl status`` shows it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable

import trio

from pagewire.protocol import PAGE_SIZE

from .backingcheck import (
    PRESSURE_SAFE_FS,
    SIGNATURE_BYTES,
    BackingError,
    check_device,
    check_directory,
    check_location,
    check_owner,
    check_signature,
    fs_type,
)
from .extents import FiemapUnsupported, unwritten_ranges

READ_THREADS = WRITE_THREADS = 4
# A read of up to this many bytes (swap-in: a few pages of readahead) runs on the event loop
# itself while recent ones took less than INLINE_READ_SECONDS each.
INLINE_READ_BYTES = 32 * PAGE_SIZE
INLINE_READ_SECONDS = 0.002
BOUNCE_BYTES = 1 << 20  # one transfer's worth: a batch, a hand-back, a swap-in read; longer ones go in turns
FILL_BYTES = 8 << 20  # zeros written per call while filling a file
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

log = logging.getLogger("vswapfs.backing")

__all__ = ["Backing", "BackingError", "check_location"]


class _Bounce:
    """Aligned, preallocated buffers for O_DIRECT, one per worker thread."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free = [mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(count)]
        for buf in self._free:
            buf.write(bytes(size))  # touched now: resident (and locked) before the first page comes
            buf.seek(0)
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        """A buffer; the worker limiters keep one free for each worker, and a caller
        beyond them (tests, start-up) gets one made for it."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        for buf in self._free:
            _unmap(buf)
        self._free = []


class Backing:
    """An open backing file or device of ``size`` bytes (a multiple of the page size),
    locked to this process (flock for a file, O_EXCL for a device).

    Its I/O runs off the event loop in a few worker threads each way, so a slow
    disk delays only the requests that need it.
    """

    def __init__(self, fd: int, size: int, path: str, *, device: bool = False, direct: bool = True,
                 pressure_risks: list[str] | None = None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.device = device
        self.direct = direct
        self.pressure_risks = pressure_risks or []
        self.read_seconds = 0.0  # recent small reads' duration: see read_into
        self._write_threads = trio.CapacityLimiter(WRITE_THREADS)
        self._read_threads = trio.CapacityLimiter(READ_THREADS)
        # One per worker thread, and one for the small reads done on the event loop itself.
        self._bounce = _Bounce(READ_THREADS + WRITE_THREADS + 1, BOUNCE_BYTES) if direct else None

    @classmethod
    def open(cls, path: str, size: int | None, mountpoint: str | None = None,
             allow_fs: frozenset[str] = frozenset(), progress: Callable[[int, int], None] | None = None
             ) -> "Backing":
        """Open ``path``: a block device (see :func:`open_device`), or a file, created with
        mode 0600 when missing.  A file is then written in full where it is not yet
        (``progress(done, total)`` is told how far), so that a refused page never needs
        space the filesystem may not have, nor a journal transaction."""
        if os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return cls.open_device(path, size)
        check_location(path, mountpoint, allow_fs)
        fd, created = _open_file(path, size)
        try:
            st = os.fstat(fd)
            actual = size if created else st.st_size
            if not created and size is not None and size != actual:
                raise BackingError(f"backing file {path} has {actual} bytes but the size asked for is {size}")
            _check_size(actual, path)  # type: ignore[arg-type]
            if created:
                os.ftruncate(fd, actual)  # type: ignore[arg-type]
            direct = set_direct(fd, path)
            fill(fd, actual, path, direct, progress)  # type: ignore[arg-type]
            risks = file_risks(fd, path, direct)
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)
            raise
        return cls(fd, actual, path, direct=direct, pressure_risks=risks)  # type: ignore[arg-type]

    @classmethod
    def open_device(cls, path: str, size: int | None) -> "Backing":
        """A block device of its own: exclusively, with O_DIRECT, once it is seen to hold
        nothing (mounted, swapped on, claimed, partitioned, or with a signature).  ``size``
        (if given) may be less than the device's: only that much is used."""
        st = os.stat(path)
        check_device(path, st)
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            why = "it is in use" if exc.errno == errno.EBUSY else exc.strerror
            raise BackingError(f"cannot open backing device {path}: {why}") from None
        try:
            whole = _device_size(fd)
            sector = _sector_size(fd)
            if PAGE_SIZE % sector:
                raise BackingError(f"backing device {path} has {sector}-byte sectors; pages are {PAGE_SIZE}")
            actual = whole - whole % PAGE_SIZE if size is None else size
            if actual > whole:
                raise BackingError(f"backing device {path} has {whole} bytes, less than the {size} asked for")
            _check_size(actual, path)
            backing = cls(fd, actual, path, device=True)
            check_signature(path, backing.read_sync(0, min(-(-SIGNATURE_BYTES // PAGE_SIZE) * PAGE_SIZE, actual)))
        except BaseException:
            os.close(fd)
            raise
        return backing

    # -- synchronous (worker threads, and tests) -------------------------------------

    def _with_bounce(self, run: Callable[[memoryview], None]) -> None:
        assert self._bounce is not None
        buf = self._bounce.take()
        try:
            with memoryview(buf) as view:
                run(view)
        finally:
            self._bounce.give(buf)

    def pwrite_many(self, parts: list[tuple[int, memoryview]]) -> None:
        """Write each (offset, data) in place; adjacent parts go in one call."""
        if self._bounce is None:
            for offset, data in parts:
                _pwrite_all(self.fd, memoryview(data), offset)
            return

        def run(bounce: memoryview) -> None:
            for offset, data in _chunks(parts, self._bounce.size):  # type: ignore[union-attr]
                n = 0
                for piece in data:
                    bounce[n : n + len(piece)] = piece
                    n += len(piece)
                _pwrite_all(self.fd, bounce[:n], offset)

        self._with_bounce(run)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        self.pwrite_many([(offset, memoryview(data))])

    def pread_into(self, offset: int, out: memoryview) -> None:
        if self._bounce is None:
            _pread_all(self.fd, out, offset, self.path)
            return

        def run(bounce: memoryview) -> None:
            size = len(bounce)
            for at in range(0, len(out), size):
                n = min(size, len(out) - at)
                _pread_all(self.fd, bounce[:n], offset + at, self.path)
                out[at : at + n] = bounce[:n]

        self._with_bounce(run)

    def read_sync(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.pread_into(offset, memoryview(out))
        return bytes(out)

    # -- async, off the event loop ----------------------------------------------------

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self.write_many([(offset, memoryview(data))])

    async def write_many(self, parts: list[tuple[int, memoryview]]) -> None:
        """Several scattered writes in one trip to a worker thread."""
        await trio.to_thread.run_sync(self.pwrite_many, parts, limiter=self._write_threads)

    async def read_into(self, offset: int, out: memoryview) -> None:
        """A swap-in sized read is done right here while the disk answers fast (the hop
        to a worker thread and back costs more than the read); a larger one, or any
        while recent reads were slow, goes to a worker thread, so that a slow disk holds
        up only the requests that need it."""
        if len(out) > INLINE_READ_BYTES:
            await trio.to_thread.run_sync(self.pread_into, offset, out, limiter=self._read_threads)
        elif self.read_seconds < INLINE_READ_SECONDS:
            self._timed_read(offset, out)
            await trio.lowlevel.checkpoint()
        else:
            await trio.to_thread.run_sync(self._timed_read, offset, out, limiter=self._read_threads)

    def _timed_read(self, offset: int, out: memoryview) -> None:
        """A small read, timed into ``read_seconds`` (a moving average of the last few)."""
        start = time.perf_counter()
        try:
            self.pread_into(offset, out)
        finally:  # a failed read counts too: a disk that errs slowly is a slow disk
            self.read_seconds += (time.perf_counter() - start - self.read_seconds) / 8

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the lock
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()


def _chunks(parts: list[tuple[int, memoryview]], limit: int) -> list[tuple[int, list[memoryview]]]:
    """Adjacent parts joined, split at ``limit`` bytes: (offset, pieces) per write call."""
    out: list[tuple[int, list[memoryview]]] = []
    end = -1
    size = 0
    for offset, data in sorted(parts, key=lambda part: part[0]):
        view = memoryview(data)
        while view:
            if offset != end or size == limit:
                out.append((offset, []))
                size = 0
            piece = view[: limit - size]
            out[-1][1].append(piece)
            size += len(piece)
            offset += len(piece)
            end = offset
            view = view[len(piece) :]
    return out


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:  # nothing written and no error: asking again would spin for ever
            raise OSError(errno.EIO, "backing write made no progress")
        view = view[n:]
        offset += n


def _pread_all(fd: int, out: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "backing file shorter than expected", path)
        done += n


def _open_file(path: str, size: int | None) -> tuple[int, bool]:
    """(fd, created): an existing file of ours alone, or a new one (mode 0600), locked."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        check_directory(path)
    except FileNotFoundError:
        raise BackingError(f"the directory of backing file {path} does not exist") from None
    try:
        fd = _open_noatime(path, flags)
        created = False
    except FileNotFoundError:
        if size is None:
            raise BackingError(f"backing file {path} does not exist: give --size to create it") from None
        _check_size(size, path)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOATIME, 0o600)
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
        if not created:
            check_owner(st, path)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)
        raise
    return fd, created


def _open_noatime(path: str, flags: int) -> int:
    """Open with O_NOATIME: a read would otherwise update the access time, on ext4 or xfs
    without ``lazytime`` a journal transaction, on the swap-in path (docs/pressure.md).
    Only the file's owner (or root) may ask for it; for anyone else the open is done
    without it, and the ownership check that follows refuses the file with its reason."""
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def set_direct(fd: int, path: str) -> bool:
    """Turn O_DIRECT on; False (with a warning) where the filesystem cannot."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as exc:
        log.warning("%s: no direct I/O here (%s): pages go through the page cache, which is not safe under "
                    "machine-wide memory pressure", path, exc.strerror)
        return False
    return True


def fill(fd: int, size: int, path: str, direct: bool, progress: Callable[[int, int], None] | None = None) -> None:
    """Write zeros wherever the file is not yet written blocks (all of it where the
    filesystem cannot say), in large O_DIRECT writes."""
    try:
        todo = unwritten_ranges(fd, size)
    except FiemapUnsupported:
        todo = [(0, size)]
    total = sum(length for _, length in todo)
    if not total:
        return
    log.info("%s: writing zeros over %d bytes not yet written, once: later writes then change no metadata",
             path, total)
    zeros = mmap.mmap(-1, min(FILL_BYTES, total), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    done = 0
    try:
        with memoryview(zeros) as view:
            for offset, length in todo:
                for at in range(offset, offset + length, len(view)):
                    n = min(len(view), offset + length - at)
                    try:
                        _pwrite_all(fd, view[:n], at)
                    except OSError as exc:
                        raise BackingError(f"cannot write {path} in full ({exc.strerror}): a refused page "
                                           f"must always have room there") from None
                    done += n
                    if progress is not None:
                        progress(done, total)
        if not direct:
            os.fsync(fd)
    finally:
        _unmap(zeros)


def _unmap(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view still exported (an error's traceback holding one): the GC unmaps it
        pass


def file_risks(fd: int, path: str, direct: bool) -> list[str]:
    """What keeps writes to this backing file from being safe under machine-wide memory
    pressure (docs/pressure.md); empty when nothing does."""
    risks = []
    magic = fs_type(path)
    kind = PRESSURE_SAFE_FS.get(magic)
    if kind is None:
        risks.append(f"the backing file's filesystem (type {magic:#x}) is not ext4 or xfs, where an overwrite in "
                     f"place is known to need no journal transaction")
    if not direct:
        risks.append("no direct I/O: backing writes go through the page cache")
    try:
        if unwritten_ranges(fd, os.fstat(fd).st_size):
            risks.append("the backing file has unwritten or shared blocks")
    except FiemapUnsupported:
        risks.append("the filesystem does not say where the file's blocks are (FIEMAP)")
    if kind is not None and "lazytime" not in mount_options(path):
        risks.append(f"{kind} is mounted without lazytime: each write's time stamp update is a journal "
                     f"transaction (mount -o remount,lazytime)")
    return risks


def mount_options(path: str, mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """The mount and superblock options of the mount holding ``path``."""
    dev = os.stat(path).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    best: tuple[int, set[str]] = (-1, set())
    real = os.path.realpath(path)
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if fields[2] != wanted:
                continue
            point = fields[4]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > best[0]:
                sep = fields.index("-")
                best = (len(point), set(fields[5].split(",")) | set(fields[sep + 3].split(",")))
    return best[1]


def _device_size(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf)
    return int.from_bytes(buf, "little")


def _sector_size(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, BLKSSZGET, buf)
    return int.from_bytes(buf, "little")


def _lock(fd: int, path: str) -> None:
    """An exclusive lock for the file's lifetime: one device per backing file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BackingError(f"backing file {path} is in use by another vswapfs (it is locked)") from None


def _check_size(size: int, path: str) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise BackingError(f"size of {path} ({size}) is not a positive multiple of {PAGE_SIZE}")
