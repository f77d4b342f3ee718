"""A client's pages in memory shared with it: the store writes, the client reads.

A store on the same host gives each client that asks for it (over a unix
socket) a memfd of its own, passed with SCM_RIGHTS along with the hello
answer.  No client can map another client's pages: each memfd reaches one
client only.  Its layout (:class:`~hoststore.messages.SharedLayout`):

* header, per slot: the version (sequence number) and the page number of the
  page in the slot; version 0 while the slot is being written or is free;
* index, per device page: its slot + 1, or 0 when the store does not hold it;
* data, per slot: the page.

The store stays in charge: it admits, refuses, frees and hands back as over
the wire, and it never reads the header or the index back (a client that
scribbled on them could only mislead itself).  A client reads a page it
believes is in the store without a round trip, seqlock style
(:meth:`SharedPages.read`): slot from the index, header must name exactly the
page and version it expects, copy, header still the same.  The store clears a
slot's version *before* it changes the slot's data and sets it only after, so
a copy that raced a change sees a different header and is retried over the
wire; the page checksum the client checks on every page is a second, independent
guard.  (On x86, stores are seen in order and loads are not reordered with
loads, which is what the header check relies on; elsewhere the checksum still
holds the line.)

Writes need the store's decision, so a put still takes a round trip, but its
data need not travel on the socket: a second memfd, the client's *staging*
area, is mapped writable by both.  The client copies a batch there and sends
``put_staged`` (where, how many); the store copies the pages it admits into
their slots.  A client can write its staging area at any time, which can only
spoil its own pages (the checksums catch that); it frees a staging range as
soon as it stops waiting for the answer, since a late put that reads reused
staging stores a version the client has already written elsewhere and asked
the store to drop.

Both memfds are sealed against shrinking, so a mapping of them can never
fault past its end (SIGBUS) whatever either side does later; memory of freed
slots goes back to the system by punching holes, which keeps the size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import mmap
import os

from .messages import PAGE_SIZE, SharedLayout
from .slab import CHUNK_PAGES, SlabFull

log = logging.getLogger("hoststore")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
STAGING_PAGES = 2048  # 8 MiB of staging per client: puts beyond that in flight go on the wire

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class SharedError(Exception):
    """Shared page memory could not be made or is not what it must be."""


def _sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_memfd(fd: int, size: int, what: str) -> None:
    have = os.fstat(fd).st_size
    if have < size:
        raise SharedError(f"{what} of {have} bytes is smaller than its layout's {size}")
    if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
        raise SharedError(f"{what} is not sealed against shrinking: a mapping could fault")


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class SharedSlab:
    """The store's side: a :class:`~hoststore.slab.Slab` (dense slots, the last
    moving into a freed one) whose data lives in the client's memfd, with the
    header and index kept up to date for the client's reads."""

    def __init__(self, npages: int, slots: int, chunk_pages: int = CHUNK_PAGES,
                 staging: int = STAGING_PAGES) -> None:
        self.layout = SharedLayout(npages, slots, staging)
        self.chunk_pages = chunk_pages
        self.used = 0
        self._touched = 0  # chunks of data that may hold memory
        size, rw = self.layout.size, mmap.PROT_READ | mmap.PROT_WRITE
        fds: list[int] = []
        try:
            fds.append(_sealed_memfd("hoststore-pages", size))
            fds.append(_sealed_memfd("hoststore-staging", max(self.layout.staging_size, PAGE_SIZE)))
            self._map = mmap.mmap(fds[0], size, mmap.MAP_SHARED, rw)
            self._staging_map = mmap.mmap(fds[1], max(self.layout.staging_size, PAGE_SIZE), mmap.MAP_SHARED, rw)
        except (OSError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            raise SharedError(f"cannot set up {size} bytes of shared memory: {exc}") from None
        self.fd, self.staging_fd = fds
        whole = memoryview(self._map)
        lay = self.layout
        self._headers = whole[: lay.index_offset].cast("Q")
        self._index = whole[lay.index_offset : lay.data_offset].cast("I")
        self._data = whole[lay.data_offset :]
        whole.release()
        self._staging = memoryview(self._staging_map)
        self.staging_resident = False
        self.keep_staging_resident()

    def keep_staging_resident(self) -> None:
        """Touch every staging page through our mapping, so that each one stays mapped (and
        locked, with the daemon's mlockall) here while the client may use it.

        The client writes staging; we read only what we admit.  Under pressure we admit
        nothing, so without this a staging page would be mapped by the client alone, and
        once the client re-maps it (a reconnect) by nobody: the kernel could then swap it
        out, possibly to the very device the client serves, and the client's next write
        to it would wait for its own swap-in (seen in a VM under machine-wide pressure)."""
        if self.staging_resident:
            return
        view = self._staging
        for offset in range(0, len(view), PAGE_SIZE):
            view[offset] = 0
        self.staging_resident = True

    def release_staging(self) -> None:
        """The client is away: its staging memory goes back to the system (nothing in it
        outlives a request), to be made resident again when it returns."""
        if not self.staging_resident:
            return
        try:
            _punch(self.staging_fd, 0, len(self._staging))
        except OSError as exc:
            log.warning("cannot give back %d bytes of staging memory: %s", len(self._staging), exc)
            return
        self.staging_resident = False

    @property
    def fds(self) -> list[int]:
        """What the client gets with its hello answer: page memory, then staging."""
        return [self.fd, self.staging_fd]

    def staged(self, at: int, n: int) -> memoryview:
        """Pages ``at .. at + n`` of the client's staging area (ValueError outside it)."""
        if at + n > self.layout.staging:
            raise ValueError(f"staging pages {at}..{at + n - 1} outside the {self.layout.staging} there are")
        return self._staging[at * PAGE_SIZE : (at + n) * PAGE_SIZE]

    # -- the Slab interface ------------------------------------------------------------

    def grow(self) -> int:
        slot = self.used
        if slot >= self.layout.slots:
            raise SlabFull(f"all {self.layout.slots} shared slots are in use")
        if slot // self.chunk_pages >= self._touched:
            self._touched += 1
        self.used += 1
        return slot

    def shrink(self) -> None:
        """Drop the last slot; give back the memory of chunks no longer needed, keeping one spare."""
        self.used -= 1
        needed = -(-self.used // self.chunk_pages) + 1
        if self._touched > needed:
            chunk_bytes = self.chunk_pages * PAGE_SIZE
            start = self.layout.data_offset + needed * chunk_bytes
            end = min(self.layout.data_offset + self._touched * chunk_bytes, self.layout.size)
            try:
                _punch(self.fd, start, end - start)
            except OSError as exc:
                log.warning("cannot give back %d bytes of shared page memory: %s", end - start, exc)
                return
            self._touched = needed

    def view(self, slot: int) -> memoryview:
        return self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]

    def write(self, slot: int, page: memoryview | bytes) -> None:
        self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = page

    def copy(self, src: int, dst: int) -> None:
        self.write(dst, self.view(src))

    @property
    def mapped_bytes(self) -> int:
        return min(self._touched * self.chunk_pages, self.layout.slots) * PAGE_SIZE

    # -- what the client reads ------------------------------------------------------------

    def publish(self, slot: int, page: int, seq: int) -> None:
        """The slot now holds version ``seq`` of ``page`` (its data is written)."""
        h = 2 * slot
        self._headers[h + 1] = page
        self._headers[h] = seq  # last: a nonzero version says the slot is complete
        self._index[page] = slot + 1

    def retract(self, slot: int, page: int) -> None:
        """The slot's data is about to change or the page leaves: no reader may take it now."""
        self._headers[2 * slot] = 0
        if self._index[page] == slot + 1:
            self._index[page] = 0

    def close(self) -> None:
        for view in (self._headers, self._index, self._data, self._staging):
            view.release()
        for mapping in (self._map, self._staging_map):
            try:
                mapping.close()
            except BufferError:  # a view still exported (a test holding one); the GC unmaps it
                pass
        for fd in (self.fd, self.staging_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.staging_fd = -1
        self.used = 0


class SharedPages:
    """The client's side: its page memory mapped read-only, its staging area writable."""

    def __init__(self, fd: int, layout: SharedLayout, staging_fd: int | None = None) -> None:
        """Takes ownership of the fds (closed here, the mappings stay)."""
        self.staging: Staging | None = None
        try:
            _check_memfd(fd, layout.size, "shared memory")
            self._map = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ)
            if staging_fd is not None and layout.staging:
                _check_memfd(staging_fd, layout.staging_size, "staging memory")
                self.staging = Staging(mmap.mmap(staging_fd, layout.staging_size, mmap.MAP_SHARED,
                                                 mmap.PROT_READ | mmap.PROT_WRITE), layout.staging)
        except OSError as exc:
            raise SharedError(f"cannot map the shared page memory: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
            if staging_fd is not None:
                os.close(staging_fd)
        self.layout = layout
        whole = memoryview(self._map)
        self._headers = whole[: layout.index_offset].cast("Q")
        self._index = whole[layout.index_offset : layout.data_offset].cast("I")
        self._data = whole[layout.data_offset :]
        whole.release()

    def read(self, page: int, seq: int, out: memoryview) -> bool:
        """Copy version ``seq`` of ``page`` into ``out`` if the store holds exactly
        that version and it did not change during the copy.  False: ask over the wire."""
        if page >= self.layout.npages:
            return False
        slot = self._index[page] - 1
        if slot < 0 or slot >= self.layout.slots:
            return False
        headers, h = self._headers, 2 * slot
        if headers[h] != seq or headers[h + 1] != page:
            return False
        out[:] = self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]
        return headers[h] == seq and headers[h + 1] == page

    def close(self) -> None:
        for view in (self._headers, self._index, self._data):
            view.release()
        try:
            self._map.close()
        except BufferError:
            pass
        if self.staging is not None:
            self.staging.close()


class Staging:
    """The client's staging area: ranges of pages taken for one put each, given back
    as soon as its caller stops waiting (first fit over a byte per page, in C)."""

    def __init__(self, mapping: mmap.mmap, pages: int) -> None:
        self._map = mapping
        self.view = memoryview(mapping)
        self.pages = pages
        self._used = bytearray(pages)
        self.in_use = 0

    def take(self, n: int) -> int | None:
        """The first page of ``n`` free ones, now taken; None if there is no such run."""
        at = self._used.find(bytes(n))
        if at < 0:
            return None
        self._used[at : at + n] = b"\x01" * n
        self.in_use += n
        return at

    def give(self, at: int, n: int) -> None:
        self._used[at : at + n] = bytes(n)
        self.in_use -= n

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass
