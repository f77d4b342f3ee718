"""The store's half of a client's shared page memory: a slab whose data lives
in a memfd the client maps, with the header and index kept up to date for the
client's reads.  The layout and its rules: ``pagewire.sharedmem``."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from array import array

from pagewire.messages import PAGE_SIZE, SharedLayout
from pagewire.sharedmem import STAGING_PAGES, SharedError

from .memfd import punch, sealed_memfd
from .prefault import PREFAULTER, Prefaulter
from .slab import CHUNK_PAGES, SlabFull
from .sizeclasses import Tally
from .zslab import Encoded, Release, ZSlab

log = logging.getLogger("hoststore")

_LIVE: weakref.WeakSet[SharedSlab] = weakref.WeakSet()  # for a forked child: their locks start afresh


def _fresh_locks() -> None:
    for slab in list(_LIVE):
        slab.lock = threading.Lock()
        slab.waiting = 0


os.register_at_fork(after_in_child=_fresh_locks)


class SharedSlab:
    """The store's side: a :class:`~hoststore.slab.Slab` (dense slots, the last
    moving into a freed one) whose data lives in the client's memfd, with the
    header and index kept up to date for the client's reads."""

    def __init__(self, npages: int, slots: int, chunk_pages: int = CHUNK_PAGES,
                 staging: int = STAGING_PAGES, compressed: bool = False,
                 prefault: Prefaulter | None = PREFAULTER) -> None:
        """``prefault``: who populates the spare chunk ahead of need (``hoststore.prefault``);
        None: pages are allocated as they are written."""
        self.layout = SharedLayout(npages, slots, staging, compressed)
        self.chunk_pages = chunk_pages
        self.used = 0
        self._touched = 0  # chunks of data that may hold memory
        self.prefault = prefault
        self.lock = threading.Lock()  # the prefault worker's while it populates our memory
        self.waiting = 0  # threads of ours waiting for it (hoststore.prefault)
        self._closed = False
        _LIVE.add(self)
        size, rw = self.layout.size, mmap.PROT_READ | mmap.PROT_WRITE
        fds: list[int] = []
        try:
            fds.append(sealed_memfd("hoststore-pages", size))
            fds.append(sealed_memfd("hoststore-staging", max(self.layout.staging_size, PAGE_SIZE)))
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
        self._data_address = 0  # for madvise; valid while mapped
        if len(self._data):
            anchor = ctypes.c_char.from_buffer(self._map, lay.data_offset)
            self._data_address = ctypes.addressof(anchor)
            del anchor  # an export would keep close from unmapping
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
            punch(self.staging_fd, 0, len(self._staging))
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
        return self.grow_run(1)

    def grow_run(self, n: int) -> int:
        """``n`` new slots at the end, all or none; the first of them."""
        first = self.used
        if first + n > self.layout.slots:
            raise SlabFull(f"all {self.layout.slots} shared slots are in use")
        self._touched = max(self._touched, (first + n - 1) // self.chunk_pages + 1)
        self.used += n
        if self.prefault is not None:
            self._ask_ahead(self.prefault)
        return first

    def _ask_ahead(self, prefault: Prefaulter) -> None:
        """Once the last slot is halfway into its chunk, the next chunk (the spare
        ``shrink`` keeps) is counted and asked to be populated, so that the copies
        into it find their memory there.  Halfway, not at once: a client going back
        and forth over a chunk's start gives back nothing it had populated."""
        last = self.used - 1
        spare = last // self.chunk_pages + 1
        if spare < self._touched or last % self.chunk_pages < self.chunk_pages // 2:
            return
        pages = min(self.chunk_pages, self.layout.slots - spare * self.chunk_pages)
        if pages <= 0:
            return
        touched = self._touched
        self._touched = spare + 1  # raised outside the lock: the worker may then do more, never less
        if not prefault.ask(self, spare * self.chunk_pages * PAGE_SIZE, pages * PAGE_SIZE):
            self._touched = touched  # populating is off: nothing of it is held

    def _out_of_the_way(self) -> contextlib.AbstractContextManager[object]:
        """Held, the prefault worker is not in our memory and does not enter it."""
        return self.prefault.out_of_the_way(self) if self.prefault is not None else contextlib.nullcontext()

    def populatable(self, offset: int, length: int) -> int | None:
        """For the prefault worker, which holds ``lock``: the address of data bytes
        ``offset ..`` while the slab is open and counts them, else None."""
        if self._closed or offset + length > self.mapped_bytes:
            return None
        return self._data_address + offset

    def write_run(self, slot: int, pages: memoryview | bytes) -> None:
        self._data[slot * PAGE_SIZE : slot * PAGE_SIZE + len(pages)] = pages

    def publish_run(self, slot: int, first: int, n: int, seq: int) -> None:
        """As :meth:`publish` for ``n`` slots holding pages ``first ..``: every page word,
        then every version (a reader takes a slot only once its version is nonzero)."""
        h = 2 * slot
        self._headers[h + 1 : h + 2 * n : 2] = array("Q", range(first, first + n))
        self._headers[h : h + 2 * n : 2] = array("Q", [seq]) * n
        self._index[first : first + n] = array("I", range(slot + 1, slot + n + 1))

    def shrink(self) -> None:
        """Drop the last slot; give back the memory of chunks no longer needed, keeping one spare."""
        self.used -= 1
        needed = -(-self.used // self.chunk_pages) + 1
        if self._touched > needed and not self._closed:
            with self._out_of_the_way():  # the worker may be in a piece of our memory: it leaves after it
                self._give_back(needed)

    def _give_back(self, needed: int) -> None:
        chunk_bytes = self.chunk_pages * PAGE_SIZE
        start = self.layout.data_offset + needed * chunk_bytes
        end = min(self.layout.data_offset + self._touched * chunk_bytes, self.layout.size)
        try:
            punch(self.fd, start, end - start)
        except OSError as exc:
            log.warning("cannot give back %d bytes of shared page memory: %s", end - start, exc)
            return
        self._touched = needed

    def view(self, slot: int) -> memoryview:
        return self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]

    def write(self, slot: int, page: memoryview | bytes) -> None:
        self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = page

    def read_into(self, slot: int, out: memoryview | bytearray) -> None:
        out[:PAGE_SIZE] = self.view(slot)

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
        with self._out_of_the_way():  # the prefault worker is out of our memory, and will not come back
            self._closed = True
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


class ZSharedSlab(SharedSlab):
    """A shared slab whose pages are kept compressed (``hoststore.zslab``): the layout's
    compressed form, each header saying where its page's bytes are."""

    def __init__(self, npages: int, slots: int, staging: int = STAGING_PAGES, tally: Tally | None = None) -> None:
        # The compressed layout's chunks are ZSlab's, which nothing populates ahead.
        super().__init__(npages, slots, staging=staging, compressed=True, prefault=None)
        self.z = ZSlab(self._data, Release(self.fd, self.layout.data_offset), self.layout.slots, self._headers,
                       self._index, tally)

    def grow(self) -> int:
        slot = self.z.grow()
        self.used = self.z.used
        return slot

    def shrink(self) -> None:
        self.z.shrink()
        self.used = self.z.used

    def write(self, slot: int, page: Encoded, pending: bool = False,  # type: ignore[override]
              hard: bool = False) -> None:
        self.z.write(slot, page, pending, hard)

    def read_into(self, slot: int, out: memoryview | bytearray) -> None:
        self.z.read_into(slot, out)

    def view(self, slot: int) -> memoryview:
        return self.z.view(slot)

    def copy(self, src: int, dst: int) -> None:
        self.z.copy(src, dst)

    def publish(self, slot: int, page: int, seq: int) -> None:
        self.z.publish(slot, page, seq)

    def retract(self, slot: int, page: int) -> None:
        self.z.retract(slot, page)

    @property
    def mapped_bytes(self) -> int:
        return self.z.mapped_bytes

    def close(self) -> None:
        self.z.close()
        super().close()
