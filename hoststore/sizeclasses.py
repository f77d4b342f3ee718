"""Compressed pages in size classes: memory that shrinks with the data.

As in zsmalloc, an object of ``n`` bytes goes into the smallest class that
holds it (``pagewire.codec.CLASS_SIZES``: 64-byte steps up to 3 KiB, then
whole pages), and each class takes memory in chunks of 64 KiB from one
region.  Unlike zsmalloc a class is kept *dense*, as the page slab is: the
objects of a class are ``0 .. n-1``, and freeing one moves the class's last
object into the hole.  A class never fragments, so a class holding ``n``
objects holds ``ceil(n / per_chunk)`` chunks.  A chunk a class no longer
needs goes back to the system, except the last few, which wait unpunched for
the next class that needs one (so that a count going up and down at a chunk
boundary does not punch and fault the same memory for ever).

The memory counted is exact: for each chunk, the pages written since it was
last punched (what the kernel holds for the memfd; ``mem_bytes``).

Every object has an *owner* (the page slot it belongs to); a move tells the
caller which owner moved, so that it can retract and republish that page
for readers of shared memory (``hoststore.zslab``).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable

from pagewire.codec import CHUNK_BYTES, CLASS_SIZES
from pagewire.messages import PAGE_SIZE

from .slab import SlabFull

log = logging.getLogger("hoststore")

PER_CHUNK = tuple(CHUNK_BYTES // size for size in CLASS_SIZES)
SPARE_CHUNKS = 4  # chunks kept unpunched for the next class that needs one


class Tally:
    """The class bytes of every object of a store's clients together, kept as objects
    come and go: what the capacity compares, without a walk over the clients per put."""

    def __init__(self) -> None:
        self.bytes = 0


class SizeClasses:
    """Objects by size class in a region of ``len(region) // CHUNK_BYTES`` chunks;
    ``release(offset, length)`` gives a range of the region's memory back; ``tally``
    counts their class bytes with those of other clients."""

    def __init__(self, region: memoryview, release: Callable[[int, int], None], tally: Tally | None = None) -> None:
        self.region = region
        self.release = release
        self.tally = tally if tally is not None else Tally()
        self.chunk_count = len(region) // CHUNK_BYTES
        self._next = 0  # chunks from here on were never used (nothing per chunk is kept for them)
        self._free: list[int] = []  # used once, punched since (or not, where a punch failed: then touched)
        self._spare: list[int] = []  # free, not punched
        self._touched: dict[int, int] = {}  # bytes of each chunk written since it was last punched (if any)
        self._chunks: list[list[int]] = [[] for _ in CLASS_SIZES]
        self._owners: list[array] = [array("i") for _ in CLASS_SIZES]
        self.object_bytes = 0  # the class sizes of all objects held
        self.mem_bytes = 0  # memory the region holds: the pages written in every chunk not punched since

    def count(self, cls: int) -> int:
        return len(self._owners[cls])

    def offset(self, cls: int, idx: int) -> int:
        per = PER_CHUNK[cls]
        return self._chunks[cls][idx // per] * CHUNK_BYTES + (idx % per) * CLASS_SIZES[cls]

    def owner(self, cls: int, idx: int) -> int:
        return self._owners[cls][idx]

    def set_owner(self, cls: int, idx: int, owner: int) -> None:
        self._owners[cls][idx] = owner

    def alloc(self, cls: int, owner: int) -> int:
        """A new object of class ``cls`` for ``owner``: its index (SlabFull: no chunk left)."""
        owners = self._owners[cls]
        idx = len(owners)
        per, chunks = PER_CHUNK[cls], self._chunks[cls]
        if idx // per >= len(chunks):
            chunks.append(self._take_chunk())
        chunk, end = chunks[idx // per], -(-(idx % per + 1) * CLASS_SIZES[cls] // PAGE_SIZE) * PAGE_SIZE
        touched = self._touched.get(chunk, 0)
        if end > touched:
            self.mem_bytes += end - touched
            self._touched[chunk] = end
        owners.append(owner)
        self.object_bytes += CLASS_SIZES[cls]
        self.tally.bytes += CLASS_SIZES[cls]
        return idx

    def _take_chunk(self) -> int:
        if self._spare:
            return self._spare.pop()
        if self._free:
            return self._free.pop()
        if self._next < self.chunk_count:
            self._next += 1
            return self._next - 1
        raise SlabFull(f"all {self.chunk_count} chunks of the size classes are in use")

    def tail_owner(self, cls: int) -> int:
        """Whose object :meth:`free` would move (the class's last)."""
        return self._owners[cls][-1]

    def free(self, cls: int, idx: int) -> None:
        """Free object ``idx``; the class's last object moves into its place (its owner
        is :meth:`tail_owner` before the call, and its index is ``idx`` after)."""
        owners = self._owners[cls]
        last = len(owners) - 1
        if idx != last:
            size = CLASS_SIZES[cls]
            src, dst = self.offset(cls, last), self.offset(cls, idx)
            self.region[dst : dst + size] = self.region[src : src + size]
            owners[idx] = owners[last]
        owners.pop()
        self.object_bytes -= CLASS_SIZES[cls]
        self.tally.bytes -= CLASS_SIZES[cls]
        self._trim(cls)

    def forget(self) -> None:
        """Every object is gone at once (the client's memory goes): the tally forgets them."""
        self.tally.bytes -= self.object_bytes
        self.object_bytes = 0
        self._owners = [array("i") for _ in CLASS_SIZES]

    def _trim(self, cls: int) -> None:
        chunks = self._chunks[cls]
        needed = -(-len(self._owners[cls]) // PER_CHUNK[cls])
        while len(chunks) > needed:
            chunk = chunks.pop()
            if len(self._spare) < SPARE_CHUNKS:
                self._spare.append(chunk)
                continue
            self._free.append(chunk)
            try:
                self.release(chunk * CHUNK_BYTES, CHUNK_BYTES)
            except OSError as exc:  # the memory stays held, and counted so
                log.warning("cannot give back %d bytes of compressed page memory: %s", CHUNK_BYTES, exc)
                continue
            self.mem_bytes -= self._touched.pop(chunk, 0)

    def check(self) -> None:
        """Internal consistency (tests): no chunk in two places, every object inside its chunks."""
        held = [c for chunks in self._chunks for c in chunks] + self._spare
        assert len(set(held)) == len(held) and not set(held) & set(self._free)
        assert len(held) + len(self._free) == self._next <= self.chunk_count and len(self._spare) <= SPARE_CHUNKS
        for cls, owners in enumerate(self._owners):
            assert len(self._chunks[cls]) == -(-len(owners) // PER_CHUNK[cls])
        assert self.mem_bytes == sum(self._touched.values()) and all(c < self._next for c in self._touched)
        assert self.object_bytes == sum(len(o) * s for o, s in zip(self._owners, CLASS_SIZES))
