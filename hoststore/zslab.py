"""A client's pages kept compressed: the slab interface over size classes.

:class:`ZSlab` keeps what :class:`~hoststore.slab.Slab` keeps (dense slots,
the last moving into a freed one, so that ``ClientPages`` is the same with or
without compression), but a slot holds a page *encoded* (``pagewire.codec``),
as an object in :class:`~hoststore.sizeclasses.SizeClasses`.  Moving a slot
moves no data (the object changes owner); freeing an object moves its class's
last object, whose page is retracted for shared readers while it moves and
published again after.

Its memory is a memfd: never mapped by anyone else for a client on the wire
(:func:`private_zslab`), shared with the client for one on a unix socket
(``hoststore.sharedslab.ZSharedSlab``), where each slot's header also says
where its bytes are (``pagewire.sharedmem``).
"""

from __future__ import annotations

import mmap
import os
from array import array

import zstandard

from pagewire.codec import CLASS_SIZES, Codec, DecodeError, class_of, decode, region_bytes
from pagewire.messages import PAGE_SIZE

from .memfd import punch
from .sizeclasses import SizeClasses, Tally
from .slab import SlabFull

Encoded = tuple[Codec, bytes]
NO_OBJECT = -1


HARD_BIT = 4  # in the where word: recompressed when idle (so that a recompression changes the word)


def where_word(offset: int, length: int, codec: int, hard: bool = False) -> int:
    """A page's place in the data area as shared readers see it: offset, length, encoding,
    and whether it was recompressed (a page recompressed into the very place, length and
    encoding it had must still change its word, or a copy torn by it would pass)."""
    return offset << 16 | length << 3 | (HARD_BIT if hard else 0) | codec


class ZSlab:
    """Encoded pages by slot.  ``headers``/``index``: the shared memory's, when shared."""

    def __init__(self, region: memoryview, release: "Release", max_slots: int, headers: memoryview | None = None,
                 index: memoryview | None = None, tally: Tally | None = None) -> None:
        """``max_slots``: the most pages it may hold (what ``region`` was sized for);
        ``tally``: the store's count of class bytes, all clients together."""
        self.classes = SizeClasses(region, release, tally)
        self.max_slots = max_slots
        self.region = region
        self._headers, self._index = headers, index
        self.used = 0
        self._cls = array("b")
        self._idx = array("i")
        self._len = array("H")
        self._codec = array("B")
        self._page = array("Q")  # as published: to publish again after a move
        self._seq = array("Q")  # 0: not published
        self._pending = bytearray()  # 1: held as it came, waiting to be compressed (hoststore.compressor)
        self._hard = bytearray()  # 1: recompressed harder, idle (hoststore.compressor)
        self.compr_bytes = 0
        self.incompressible = 0  # held as they are because they do not shrink enough
        self.pending = 0
        self.dictionary: zstandard.ZstdCompressionDict | None = None  # what ZSTD_DICT pages decode with
        self._decompressor: zstandard.ZstdDecompressor | None = None
        self._dictionary_bytes = 0

    # -- the Slab interface ------------------------------------------------------------

    def grow(self) -> int:
        slot = self.used
        if slot >= self.max_slots:
            raise SlabFull(f"all {self.max_slots} slots for compressed pages are in use")
        for arr, value in ((self._cls, NO_OBJECT), (self._idx, 0), (self._len, 0), (self._codec, 0),
                           (self._page, 0), (self._seq, 0), (self._pending, 0), (self._hard, 0)):
            arr.append(value)
        self.used += 1
        return slot

    def shrink(self) -> None:
        last = self.used - 1
        self._free(last)
        for arr in (self._cls, self._idx, self._len, self._codec, self._page, self._seq, self._pending, self._hard):
            arr.pop()
        self.used -= 1

    def write(self, slot: int, encoded: Encoded, pending: bool = False, hard: bool = False) -> None:
        """Slot ``slot`` now holds ``encoded`` (its old object freed).  ``pending``: a page
        held as it came, to be compressed later; ``hard``: recompressed as idle.  SlabFull:
        no memory."""
        codec, blob = encoded
        self._free(slot)
        length = len(blob)
        cls = class_of(length)
        classes = self.classes
        idx = classes.alloc(cls, slot)
        at = classes.offset(cls, idx)
        self.region[at : at + length] = blob
        self._cls[slot], self._idx[slot], self._len[slot], self._codec[slot] = cls, idx, length, codec
        self.compr_bytes += length
        self._hard[slot] = hard
        if pending:
            self._pending[slot] = 1
            self.pending += 1
        elif codec == Codec.RAW:
            self.incompressible += 1

    def is_pending(self, slot: int) -> bool:
        return bool(self._pending[slot])

    def is_hard(self, slot: int) -> bool:
        return bool(self._hard[slot])

    def mark_hard(self, slot: int) -> None:
        """Tried harder, to no gain: not to be tried again.  Its bytes stay where they are,
        so its header may keep its word (the bit is there to make a recompression, which
        moves the bytes, change the word; the next move puts it in)."""
        self._hard[slot] = 1

    def read_into(self, slot: int, out: memoryview | bytearray) -> None:
        """The page in ``slot``, decoded into ``out`` (DecodeError: damaged)."""
        if self._cls[slot] == NO_OBJECT:
            raise DecodeError(f"slot {slot} holds no page")
        decode(self._codec[slot], self.encoded_view(slot), out, self._dictionary)

    def decoded(self, slot: int) -> bytes:
        """The page in ``slot`` (DecodeError: damaged)."""
        if self._pending[slot]:
            return bytes(self.encoded_view(slot))
        out = bytearray(PAGE_SIZE)
        self.read_into(slot, out)
        return bytes(out)

    def encoded_view(self, slot: int) -> memoryview:
        at = self.classes.offset(self._cls[slot], self._idx[slot])
        return self.region[at : at + self._len[slot]]

    def class_bytes(self, slot: int) -> int:
        """What the slot's page costs: its size class."""
        return CLASS_SIZES[self._cls[slot]]

    def encoding(self, slot: int) -> Codec:
        return Codec(self._codec[slot])

    def _dictionary(self) -> zstandard.ZstdDecompressor:
        if self._decompressor is None:
            if self.dictionary is None:
                raise DecodeError("a page compressed with a dictionary this store does not have")
            self._decompressor = zstandard.ZstdDecompressor(dict_data=self.dictionary)
        return self._decompressor

    def set_dictionary(self, dictionary: zstandard.ZstdCompressionDict) -> None:
        """Idle pages are recompressed with this from now on (set once: pages keep needing it)."""
        assert self.dictionary is None
        self.dictionary, self._decompressor = dictionary, None
        self._dictionary_bytes = len(dictionary.as_bytes())

    def view(self, slot: int) -> memoryview:
        out = bytearray(PAGE_SIZE)
        self.read_into(slot, out)
        return memoryview(out)

    def copy(self, src: int, dst: int) -> None:
        """The page in ``src`` now belongs to ``dst`` (whose own page goes): no data moves."""
        self._free(dst)
        cls, idx = self._cls[src], self._idx[src]
        self._cls[dst], self._idx[dst], self._len[dst], self._codec[dst] = cls, idx, self._len[src], self._codec[src]
        self._pending[dst], self._pending[src] = self._pending[src], 0
        self._hard[dst], self._hard[src] = self._hard[src], 0
        self._cls[src] = NO_OBJECT
        if cls != NO_OBJECT:
            self.classes.set_owner(cls, idx, dst)

    def publish(self, slot: int, page: int, seq: int) -> None:
        self._page[slot], self._seq[slot] = page, seq
        headers = self._headers
        if headers is None or self._index is None:
            return
        h = 3 * slot
        headers[h + 1] = page
        headers[h + 2] = self._where(slot)
        headers[h] = seq  # last: a nonzero version says the slot is complete
        self._index[page] = slot + 1

    def retract(self, slot: int, page: int) -> None:
        self._seq[slot] = 0
        if self._headers is None or self._index is None:
            return
        self._headers[3 * slot] = 0
        if self._index[page] == slot + 1:
            self._index[page] = 0

    @property
    def mapped_bytes(self) -> int:
        """The size classes' memory, and the dictionary's where there is one."""
        return self.classes.mem_bytes + self._dictionary_bytes

    @property
    def charged_bytes(self) -> int:
        """What the pages cost against capacity and quotas: their size classes."""
        return self.classes.object_bytes

    def close(self) -> None:
        self.classes.forget()
        self.used = 0

    # -- moves -----------------------------------------------------------------------------

    def _where(self, slot: int) -> int:
        return where_word(self.classes.offset(self._cls[slot], self._idx[slot]), self._len[slot], self._codec[slot],
                          bool(self._hard[slot]))

    def _free(self, slot: int) -> None:
        """Free the slot's object; the class's last object moves into its place, its
        page retracted while it moves and published again after."""
        cls = self._cls[slot]
        if cls == NO_OBJECT:
            return
        idx = self._idx[slot]
        self.compr_bytes -= self._len[slot]
        if self._pending[slot]:
            self._pending[slot] = 0
            self.pending -= 1
        elif self._codec[slot] == Codec.RAW:
            self.incompressible -= 1
        self._cls[slot] = NO_OBJECT
        mover = self.classes.tail_owner(cls)
        seq = self._seq[mover] if mover != slot else 0
        if seq and self._headers is not None:
            self._headers[3 * mover] = 0
        self.classes.free(cls, idx)
        if mover != slot:
            self._idx[mover] = idx
            if seq:
                self.publish(mover, self._page[mover], seq)

    def check(self) -> None:
        """Internal consistency (tests): every slot's object is its own, the sums are right."""
        self.classes.check()
        held = [s for s in range(self.used) if self._cls[s] != NO_OBJECT]
        for s in held:
            assert self.classes.owner(self._cls[s], self._idx[s]) == s
            assert class_of(self._len[s]) == self._cls[s]
        assert sum(self.classes.count(c) for c in range(len(CLASS_SIZES))) == len(held)
        assert self.compr_bytes == sum(self._len[s] for s in held)
        assert self.pending == sum(self._pending[s] for s in held) == sum(self._pending)
        raw = sum(1 for s in held if self._codec[s] == Codec.RAW and not self._pending[s])
        assert self.incompressible == raw


class Release:
    """Gives a range of a memfd region's memory back (a hole punched: the size stays)."""

    def __init__(self, fd: int, base: int) -> None:
        self.fd, self.base = fd, base

    def __call__(self, offset: int, length: int) -> None:
        """OSError: the memory stays held (and counted: ``SizeClasses`` keeps the chunk)."""
        punch(self.fd, self.base + offset, length)


class PrivateZSlab(ZSlab):
    """A :class:`ZSlab` in a memfd of its own, shared with nobody (a client on the wire).
    A memfd and not anonymous memory: its size is reserved by nobody, whatever the device's."""

    def __init__(self, slots: int, tally: Tally | None = None) -> None:
        size = region_bytes(slots)
        try:
            fd = os.memfd_create("hoststore-zpages", os.MFD_CLOEXEC)
        except OSError as exc:
            raise SlabFull(f"no memfd for compressed pages: {exc}") from None
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise SlabFull(f"cannot map {size} bytes for compressed pages: {exc}") from None
        self.fd = fd
        super().__init__(memoryview(self._map), Release(fd, 0), slots, tally=tally)

    def close(self) -> None:
        super().close()
        self.region.release()
        self.classes.region.release()
        try:
            self._map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.classes.release = Release(-1, 0)  # nothing is punched in a file number used again
