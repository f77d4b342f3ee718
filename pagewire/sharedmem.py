"""A client's pages in memory shared with it: the layout's rules and the client's half.

The store's half (the slab whose data lives in the memfd) is
``hoststore.sharedslab``; this module is what both sides share.

A store on the same host gives each client that asks for it (over a unix
socket) a memfd of its own, passed with SCM_RIGHTS along with the hello
answer.  No client can map another client's pages: each memfd reaches one
client only.  Its layout (:class:`~pagewire.messages.SharedLayout`):

* header, per slot: the version (sequence number) and the page number of the
  page in the slot; version 0 while the slot is being written or is free;
* index, per device page: its slot + 1, or 0 when the store does not hold it;
* data, per slot: the page.

A store that keeps pages compressed (``hoststore --compress``) says so in the
layout (``compressed``): each header then has a third word saying where the
slot's bytes are in the data area (offset << 16 | length << 3 | 4 if the page
was recompressed when idle | encoding, ``pagewire.codec``), and the data area holds the size classes' chunks
(``hoststore.sizeclasses``).  The reader copies those bytes under the same
rule, then decodes them; a copy that does not decode to a page is a torn or
damaged one, and goes to the store over the wire like any other.

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

import fcntl
import mmap
import os

from .codec import Codec, DecodeError, decode
from .messages import PAGE_SIZE, SharedLayout

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
STAGING_PAGES = 2048  # 8 MiB of staging per client: puts beyond that in flight go on the wire


class SharedError(Exception):
    """Shared page memory could not be made or is not what it must be."""


def check_memfd(fd: int, size: int, what: str) -> None:
    """``fd`` is at least ``size`` bytes and sealed against shrinking (a mapping of it cannot fault)."""
    have = os.fstat(fd).st_size
    if have < size:
        raise SharedError(f"{what} of {have} bytes is smaller than its layout's {size}")
    if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
        raise SharedError(f"{what} is not sealed against shrinking: a mapping could fault")


class SharedPages:
    """The client's side: its page memory mapped read-only, its staging area writable."""

    def __init__(self, fd: int, layout: SharedLayout, staging_fd: int | None = None) -> None:
        """Takes ownership of the fds (closed here, the mappings stay)."""
        self.staging: Staging | None = None
        try:
            check_memfd(fd, layout.size, "shared memory")
            self._map = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ)
            if staging_fd is not None and layout.staging:
                check_memfd(staging_fd, layout.staging_size, "staging memory")
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
        if layout.compressed:
            self.read = self._read_compressed  # type: ignore[method-assign]

    def _slot(self, page: int) -> int:
        """The slot the index names for ``page``, or -1 (outside the device, or no slot there)."""
        if page >= self.layout.npages:
            return -1
        slot = self._index[page] - 1
        return slot if slot < self.layout.slots else -1

    def read(self, page: int, seq: int, out: memoryview) -> bool:
        """Copy version ``seq`` of ``page`` into ``out`` if the store holds exactly
        that version and it did not change during the copy.  False: ask over the wire."""
        slot = self._slot(page)
        if slot < 0:
            return False
        headers, h = self._headers, 2 * slot
        if headers[h] != seq or headers[h + 1] != page:
            return False
        out[:] = self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]
        return headers[h] == seq and headers[h + 1] == page

    def _read_compressed(self, page: int, seq: int, out: memoryview) -> bool:
        """:meth:`read` of a compressed layout: copy the bytes, check, then decode them."""
        slot = self._slot(page)
        if slot < 0:
            return False
        headers, h = self._headers, 3 * slot
        where = headers[h + 2]
        if headers[h] != seq or headers[h + 1] != page:
            return False
        offset, length, codec = where >> 16, (where >> 3) & 0x1FFF, where & 3  # (4: recompressed when idle)
        if codec == Codec.ZSTD_DICT or not 0 < length <= PAGE_SIZE or offset + length > len(self._data):
            return False
        blob = bytes(self._data[offset : offset + length])
        if headers[h] != seq or headers[h + 1] != page or headers[h + 2] != where:
            return False
        try:
            decode(codec, blob, out)
        except DecodeError:
            return False
        return True

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
