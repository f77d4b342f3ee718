"""Where a client's pages sit in the store's memory, and how they are found.

:class:`Slab` holds page data in anonymous memory chunks, kept *dense*: slots
``0 .. used-1`` are in use, and freeing a slot moves the last page into the
hole.  Chunks past the end are unmapped (one spare is kept), so memory the
store frees goes back to the system instead of staying mapped for ever.

:class:`PageIndex` maps page numbers to slots in small arrays allocated only
for ranges that hold pages: a client's index grows with the pages it stores,
not with the device size it claims.
"""

from __future__ import annotations

import mmap
from array import array

from pagewire.messages import PAGE_SIZE

CHUNK_PAGES = 1024  # 4 MiB of page data per mapping
INDEX_SHIFT = 8  # 256 pages per index block (1 KiB)
INDEX_BLOCK = 1 << INDEX_SHIFT
_EMPTY_BLOCK = array("i", [-1]) * INDEX_BLOCK


class SlabFull(Exception):
    """No memory could be mapped for another page."""


class Slab:
    def __init__(self, chunk_pages: int = CHUNK_PAGES) -> None:
        self.chunk_pages = chunk_pages
        self._chunks: list[mmap.mmap] = []
        self.used = 0

    def grow(self) -> int:
        """A new slot at the end (its data is whatever was there)."""
        return self.grow_run(1)

    def grow_run(self, n: int) -> int:
        """``n`` new slots at the end, all or none; the first of them."""
        first = self.used
        had = len(self._chunks)
        try:
            while (first + n - 1) // self.chunk_pages >= len(self._chunks):
                self._chunks.append(
                    mmap.mmap(-1, self.chunk_pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                )
        except (OSError, MemoryError, ValueError) as exc:
            while len(self._chunks) > had:
                self._chunks.pop().close()
            raise SlabFull(str(exc)) from None
        self.used += n
        return first

    def shrink(self) -> None:
        """Drop the last slot; unmap chunks no longer needed, keeping one spare."""
        self.used -= 1
        needed = -(-self.used // self.chunk_pages) + 1
        while len(self._chunks) > needed:
            self._chunks.pop().close()

    def write_run(self, slot: int, pages: memoryview | bytes) -> None:
        """Consecutive pages into consecutive slots from ``slot``: a copy per chunk."""
        view = memoryview(pages)
        done, total = 0, len(view)
        while done < total:
            chunk, index = divmod(slot + done // PAGE_SIZE, self.chunk_pages)
            off = index * PAGE_SIZE
            take = min(total - done, self.chunk_pages * PAGE_SIZE - off)
            self._chunks[chunk][off : off + take] = view[done : done + take]
            done += take

    def publish_run(self, slot: int, first: int, n: int, seq: int) -> None:
        """As :meth:`publish`, for ``n`` slots holding pages ``first ..``."""

    def view(self, slot: int) -> memoryview:
        chunk, index = divmod(slot, self.chunk_pages)
        off = index * PAGE_SIZE
        return memoryview(self._chunks[chunk])[off : off + PAGE_SIZE]

    def write(self, slot: int, page: memoryview | bytes) -> None:
        chunk, index = divmod(slot, self.chunk_pages)
        off = index * PAGE_SIZE
        self._chunks[chunk][off : off + PAGE_SIZE] = page

    def read_into(self, slot: int, out: memoryview | bytearray) -> None:
        out[:PAGE_SIZE] = self.view(slot)

    def copy(self, src: int, dst: int) -> None:
        self.write(dst, self.view(src))

    def publish(self, slot: int, page: int, seq: int) -> None:
        """Nobody reads this slab but the store: nothing to tell (see SharedSlab)."""

    def retract(self, slot: int, page: int) -> None:
        """As :meth:`publish`."""

    @property
    def mapped_bytes(self) -> int:
        return len(self._chunks) * self.chunk_pages * PAGE_SIZE

    def close(self) -> None:
        for chunk in self._chunks:
            try:
                chunk.close()
            except BufferError:  # a view still exported (a test holding one); the GC unmaps it
                pass
        self._chunks.clear()
        self.used = 0


class CountSlab:
    """Slots without data, for a store whose page data lives in a tier elsewhere
    (``hoststore.redistier``): it counts slots, and holds nothing to read."""

    mapped_bytes = 0

    def __init__(self) -> None:
        self.used = 0

    def grow(self) -> int:
        self.used += 1
        return self.used - 1

    def grow_run(self, n: int) -> int:
        self.used += n
        return self.used - n

    def write_run(self, slot: int, pages: memoryview | bytes) -> None:
        raise LookupError("this store's page data is in its tier, not here")

    def publish_run(self, slot: int, first: int, n: int, seq: int) -> None:
        """Nobody reads this slab."""

    def shrink(self) -> None:
        self.used -= 1

    def view(self, slot: int) -> memoryview:
        raise LookupError("this store's page data is in its tier, not here")

    def write(self, slot: int, page: memoryview | bytes) -> None:
        raise LookupError("this store's page data is in its tier, not here")

    def read_into(self, slot: int, out: memoryview | bytearray) -> None:
        raise LookupError("this store's page data is in its tier, not here")

    def copy(self, src: int, dst: int) -> None:
        """Slots move as pages leave; there is no data here to move."""

    def publish(self, slot: int, page: int, seq: int) -> None:
        """Nobody reads this slab."""

    def retract(self, slot: int, page: int) -> None:
        """Nobody reads this slab."""

    def close(self) -> None:
        self.used = 0


class PageIndex:
    """page -> slot (-1: not stored), in 256-page blocks that exist only while used."""

    def __init__(self) -> None:
        self._blocks: dict[int, array] = {}
        self._counts: dict[int, int] = {}
        self.count = 0

    def get(self, page: int) -> int:
        block = self._blocks.get(page >> INDEX_SHIFT)
        return -1 if block is None else block[page & (INDEX_BLOCK - 1)]

    def set(self, page: int, slot: int) -> None:
        key = page >> INDEX_SHIFT
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = array("i", _EMPTY_BLOCK)
            self._counts[key] = 0
        i = page & (INDEX_BLOCK - 1)
        if block[i] < 0:
            self._counts[key] += 1
            self.count += 1
        block[i] = slot

    def any_in(self, first: int, n: int) -> bool:
        """Whether any page of ``first .. first + n`` is stored."""
        page, end = first, first + n
        while page < end:
            key, i = page >> INDEX_SHIFT, page & (INDEX_BLOCK - 1)
            stop = min(INDEX_BLOCK, i + end - page)
            block = self._blocks.get(key)
            if block is not None and max(block[i:stop]) >= 0:
                return True
            page += stop - i
        return False

    def set_new_run(self, first: int, n: int, slot: int) -> None:
        """Pages ``first ..`` (none of them stored: see :meth:`any_in`) now in slots ``slot ..``."""
        page, end = first, first + n
        while page < end:
            key, i = page >> INDEX_SHIFT, page & (INDEX_BLOCK - 1)
            stop = min(INDEX_BLOCK, i + end - page)
            at = slot + page - first
            slots = array("i", range(at, at + stop - i))  # before any change: a MemoryError leaves none
            block = self._blocks.get(key)
            if block is None:
                block = self._blocks[key] = array("i", _EMPTY_BLOCK)
                self._counts[key] = 0
            block[i:stop] = slots
            self._counts[key] += stop - i
            self.count += stop - i
            page += stop - i

    def clear(self, page: int) -> None:
        key = page >> INDEX_SHIFT
        block = self._blocks.get(key)
        i = page & (INDEX_BLOCK - 1)
        if block is None or block[i] < 0:
            return
        block[i] = -1
        self.count -= 1
        self._counts[key] -= 1
        if not self._counts[key]:
            del self._blocks[key], self._counts[key]

    def blocks_in(self, first: int, count: int) -> list[int]:
        """The index blocks holding pages of ``first .. first + count``, in order: the
        work of a range follows what is stored in it, not its length."""
        lo, hi = first >> INDEX_SHIFT, (first + count - 1) >> INDEX_SHIFT
        if hi - lo + 1 > len(self._blocks):
            return sorted(k for k in self._blocks if lo <= k <= hi)
        return [k for k in range(lo, hi + 1) if k in self._blocks]

    def stored_in(self, first: int, count: int) -> list[tuple[int, int]]:
        """(page, slot) of every stored page in ``first .. first + count``."""
        return self.stored_in_blocks(self.blocks_in(first, count), first, first + count)

    def stored_in_blocks(self, keys: list[int], first: int, end: int) -> list[tuple[int, int]]:
        """(page, slot) of the stored pages in blocks ``keys`` within ``first .. end``."""
        out = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                continue
            base = key << INDEX_SHIFT
            for i, slot in enumerate(block):
                if slot >= 0 and first <= base + i < end:
                    out.append((base + i, slot))
        return out

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * INDEX_BLOCK * 4
