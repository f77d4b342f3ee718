"""One client's pages: data, where each page sits, its version, and its age.

Per stored page the store keeps, in arrays indexed by slot (no Python object
per page): the page number, the sequence number of the stored version, a
use stamp, and links of a least-recently-used list.  Pages being handed back
("lent") are taken off that list until the client answers.  Everything is
dense (see :class:`~hoststore.slab.Slab`): when a page leaves, the last slot
moves into its place and every array shrinks by one, so memory follows the
number of pages stored.
"""

from __future__ import annotations

import logging
from array import array

from pagewire.codec import Codec, DecodeError
from pagewire.messages import PAGE_SIZE, POOL_EPHEMERAL, POOL_SWAP
from pagewire.sharedmem import SharedError

from .sharedslab import SharedSlab, ZSharedSlab
from .sizeclasses import Tally
from .slab import CountSlab, PageIndex, Slab, SlabFull
from .zslab import Encoded, PrivateZSlab, ZSlab

AnySlab = Slab | SharedSlab | CountSlab | ZSlab

log = logging.getLogger("hoststore")

NIL = -1


class ClientPages:
    def __init__(self, name: str, npages: int, instance: str, secret: bytes, shared_slots: int = 0,
                 tier_id: int = 0, compress: Codec | None = None, max_slots: int = 0,
                 tally: Tally | None = None) -> None:
        """``shared_slots``: keep the data in memory shared with the client (that many
        slots at most; see ``pagewire.sharedmem``), or 0 for private memory.  Where
        shared memory cannot be had, private memory serves (``shared`` tells).
        ``tier_id``: a page tier keeps the data under this number (see
        ``hoststore.redistier``), and this object keeps only the pages' versions.
        ``compress``: keep the pages in this encoding where they shrink (``hoststore.zslab``);
        the data given to :meth:`add` and :meth:`replace` is then encoded (``pagewire.codec``);
        ``max_slots``: the most pages kept compressed in private memory (default: the device's);
        ``tally``: the store's count of compressed pages' class bytes, all clients together."""
        self.tally = tally
        self.name = name
        self.max_slots = max_slots or npages
        self.compress = compress
        self.tier_id = tier_id
        self.npages = npages
        self.instance = instance
        self.secret = secret
        self.shared_slots = shared_slots
        self.ephemeral = False  # an ephemeral pool: its pages may be dropped at any time (messages.POOL_EPHEMERAL)
        self.session: object | None = None  # the connection serving this client, if any
        self.away_since: float | None = None  # when its last connection ended
        self._reset()

    @property
    def pool(self) -> str:
        """What its pages are to the store (``pagewire.messages.POOLS``)."""
        return POOL_EPHEMERAL if self.ephemeral else POOL_SWAP

    def _reset(self, slab: bool = True) -> None:
        self.index = PageIndex()
        self.slab: AnySlab = self._new_slab() if slab else Slab()
        # The compressed pages, when this client's are kept compressed (looked up on every page).
        self.zslab: ZSlab | None = self.slab.z if isinstance(self.slab, ZSharedSlab) else \
            self.slab if isinstance(self.slab, ZSlab) else None
        self.page_of = array("Q")
        self.seq_of = array("Q")
        self.stamp = array("Q")
        self.prev = array("i")
        self.next = array("i")
        self.lent = bytearray()
        self.head = NIL  # most recently used
        self.tail = NIL  # least recently used: handed back first
        self.lent_count = 0

    def _new_slab(self) -> AnySlab:
        if self.tier_id:
            return CountSlab()
        if self.shared_slots:
            try:
                if self.compress is not None:
                    return ZSharedSlab(self.npages, self.shared_slots, tally=self.tally)
                return SharedSlab(self.npages, self.shared_slots)
            except SharedError as exc:
                log.warning("client %r: no shared page memory (%s); its pages travel on the wire", self.name, exc)
        return PrivateZSlab(self.max_slots, self.tally) if self.compress is not None else Slab()

    @property
    def charged_bytes(self) -> int:
        """What this client's pages cost against capacity and quotas: 4 KiB each,
        or their size classes' bytes when they are kept compressed."""
        z = self.zslab
        return self.count * PAGE_SIZE if z is None else z.charged_bytes

    @property
    def charged_pages(self) -> int:
        return -(-self.charged_bytes // PAGE_SIZE)

    @property
    def shared(self) -> SharedSlab | None:
        return self.slab if isinstance(self.slab, SharedSlab) else None

    @property
    def count(self) -> int:
        return self.slab.used

    @property
    def connected(self) -> bool:
        return self.session is not None

    @property
    def oldest_stamp(self) -> int | None:
        return None if self.tail == NIL else self.stamp[self.tail]

    # -- the LRU list -----------------------------------------------------------

    def _link_front(self, slot: int) -> None:
        self.prev[slot] = NIL
        self.next[slot] = self.head
        if self.head != NIL:
            self.prev[self.head] = slot
        self.head = slot
        if self.tail == NIL:
            self.tail = slot

    def _unlink(self, slot: int) -> None:
        p, n = self.prev[slot], self.next[slot]
        self._join(p, n, n, p)

    def _join(self, p: int, n: int, after_p: int, before_n: int) -> None:
        """The slot before a place in the list (``p``) now has ``after_p`` after it, and the
        slot after it (``n``) ``before_n`` before it; NIL ends are the head and the tail."""
        if p != NIL:
            self.next[p] = after_p
        else:
            self.head = after_p
        if n != NIL:
            self.prev[n] = before_n
        else:
            self.tail = before_n

    def touch(self, slot: int, stamp: int) -> None:
        self.stamp[slot] = stamp
        if not self.lent[slot] and self.head != slot:
            self._unlink(slot)
            self._link_front(slot)

    # -- pages ----------------------------------------------------------------------

    def add(self, page: int, seq: int, data: memoryview | bytes | Encoded | None, stamp: int,
            pending: bool = False) -> int:
        """Store a page not stored yet (its version only, where ``data`` is None: a
        tier holds the data); raises SlabFull when no memory can be had.  ``pending``:
        compressed pages only, ``data`` is the page as it came, to be compressed later.
        All or nothing: a failure half-way leaves everything as it was."""
        slot = self.slab.grow()
        try:
            if pending:
                self.slab.write(slot, data, pending=True)  # type: ignore[call-arg]
            elif data is not None:
                self.slab.write(slot, data)
            self.slab.publish(slot, page, seq)
            self.page_of.append(page)
            self.seq_of.append(seq)
            self.stamp.append(stamp)
            self.prev.append(NIL)
            self.next.append(NIL)
            self.lent.append(0)
            self.index.set(page, slot)
        except BaseException as exc:
            for arr in (self.page_of, self.seq_of, self.stamp, self.prev, self.next, self.lent):
                del arr[slot:]
            if self.index.get(page) == slot:
                self.index.clear(page)
            self.slab.retract(slot, page)
            self.slab.shrink()
            if isinstance(exc, MemoryError):
                raise SlabFull(f"out of memory for the page index: {exc}") from None
            raise
        self._link_front(slot)
        return slot

    def add_run(self, first: int, seq: int, data: memoryview | None, n: int, stamp: int) -> None:
        """Store pages ``first .. first + n``, none of them stored yet, kept as they came
        (never for pages kept compressed), in consecutive slots: one copy, and a slice of
        each array, instead of a page at a time.  Their data (None: a tier holds it) is
        written before any of them is published.  All or nothing, as :meth:`add`."""
        if self.zslab is not None:  # compressed slabs lay slots out otherwise: page by page only
            raise TypeError("add_run is for pages kept as they came, not compressed ones")
        slot = self.slab.grow_run(n)
        try:
            if data is not None:
                self.slab.write_run(slot, data)
            self.slab.publish_run(slot, first, n, seq)
            self.page_of.extend(range(first, first + n))
            self.seq_of.extend(array("Q", [seq]) * n)
            self.stamp.extend(array("Q", [stamp]) * n)
            # The run goes to the front of the LRU list as n adds would put it: the
            # last page first; each page's next is the one before it, the first's the old head.
            self.prev.extend(range(slot + 1, slot + n + 1))
            self.next.extend(range(slot - 1, slot + n - 1))
            self.lent.extend(bytes(n))
            self.index.set_new_run(first, n, slot)
        except BaseException as exc:
            for arr in (self.page_of, self.seq_of, self.stamp, self.prev, self.next, self.lent):
                del arr[slot:]
            for page in range(first, first + n):
                if self.index.get(page) >= slot:
                    self.index.clear(page)
            for k in reversed(range(n)):
                self.slab.retract(slot + k, first + k)
                self.slab.shrink()
            if isinstance(exc, MemoryError):
                raise SlabFull(f"out of memory for the page index: {exc}") from None
            raise
        last = slot + n - 1
        self.prev[last] = NIL
        self.next[slot] = self.head
        if self.head != NIL:
            self.prev[self.head] = slot
        else:
            self.tail = slot
        self.head = last

    def replace(self, slot: int, seq: int, data: memoryview | bytes | Encoded | None, stamp: int,
                pending: bool = False) -> None:
        """A newer version over a stored one; a page being handed back is taken back from the hand-back."""
        page = self.page_of[slot]
        self.slab.retract(slot, page)
        if pending:
            self.slab.write(slot, data, pending=True)  # type: ignore[call-arg]
        elif data is not None:
            self.slab.write(slot, data)
        self.slab.publish(slot, page, seq)
        self.seq_of[slot] = seq
        if self.lent[slot]:
            self.lent[slot] = 0
            self.lent_count -= 1
            self._link_front(slot)
        self.touch(slot, stamp)

    def recode(self, slot: int, data: Encoded, hard: bool = False) -> None:
        """The same version of the page in ``slot``, encoded anew (compressed at last, or
        ``hard``er as idle): readers of shared memory see it retracted while it moves."""
        page = self.page_of[slot]
        self.slab.retract(slot, page)
        self.slab.write(slot, data, hard=hard)  # type: ignore[call-arg]
        self.slab.publish(slot, page, self.seq_of[slot])

    def remove(self, slot: int) -> None:
        """Forget the page in ``slot``; the last slot moves into its place."""
        if self.lent[slot]:
            self.lent_count -= 1
        else:
            self._unlink(slot)
        self.index.clear(self.page_of[slot])
        self.slab.retract(slot, self.page_of[slot])
        last = self.slab.used - 1
        if slot != last:
            self._move(last, slot)
            self.slab.retract(last, self.page_of[slot])  # its page now reads from ``slot``
        for arr in (self.page_of, self.seq_of, self.stamp, self.prev, self.next):
            arr.pop()
        self.lent.pop()
        self.slab.shrink()

    def _move(self, src: int, dst: int) -> None:
        """The page in ``src`` moves to ``dst`` (already retracted): readers of the old
        slot keep reading it until ``src`` is retracted, then find it in ``dst``."""
        self.slab.copy(src, dst)
        self.slab.publish(dst, self.page_of[src], self.seq_of[src])
        self.page_of[dst] = self.page_of[src]
        self.seq_of[dst] = self.seq_of[src]
        self.stamp[dst] = self.stamp[src]
        self.lent[dst] = self.lent[src]
        p, n = self.prev[src], self.next[src]
        self.prev[dst], self.next[dst] = p, n
        if not self.lent[src]:
            self._join(p, n, dst, dst)
        self.index.set(self.page_of[src], dst)

    def close(self) -> int:
        """This client is done with (replaced by a new instance, or forgotten): its
        memory and file descriptors go now.  Returns the pages it held."""
        dropped = self.count
        self.slab.close()
        self._reset(slab=False)
        return dropped

    # -- hand-back ------------------------------------------------------------------

    def lend_oldest(self, limit: int, with_data: bool = True) -> tuple[array, array, bytearray, list[int]]:
        """Take up to ``limit`` least recently used pages off the list to hand back:
        their page numbers, versions and data (copied; none without ``with_data``),
        and the slots whose data could not be read (damaged, not lent)."""
        slots = []
        slot = self.tail
        while slot != NIL and len(slots) < limit:
            slots.append(slot)
            slot = self.prev[slot]
        return self.lend_slots(slots, with_data)

    def lend_slots(self, slots: list[int], with_data: bool = True) -> tuple[array, array, bytearray, list[int]]:
        """Take these pages (stored, none lent yet) off the list to hand back, as ``lend_oldest``."""
        damaged = []
        if with_data:
            data = bytearray(len(slots) * PAGE_SIZE)
            view, good = memoryview(data), []
            for s in slots:
                try:
                    self.slab.read_into(s, view[len(good) * PAGE_SIZE : (len(good) + 1) * PAGE_SIZE])
                except DecodeError:
                    damaged.append(s)
                else:
                    good.append(s)
            view.release()
            del data[len(good) * PAGE_SIZE :]
            slots = good
        else:
            data = bytearray()
        for s in slots:
            self._unlink(s)
            self.lent[s] = 1
        self.lent_count += len(slots)
        pages, seqs = array("Q", (self.page_of[s] for s in slots)), array("Q", (self.seq_of[s] for s in slots))
        return pages, seqs, data, damaged

    def lent_slot(self, page: int, seq: int) -> int:
        """The slot still lent out with exactly this version, or NIL."""
        slot = self.index.get(page)
        if slot == NIL or not self.lent[slot] or self.seq_of[slot] != seq:
            return NIL
        return slot

    def unlend(self, slot: int) -> None:
        """The client could not take it: back on the list, as if just used."""
        self.lent[slot] = 0
        self.lent_count -= 1
        self._link_front(slot)

    def check(self) -> None:
        """Internal consistency (tests): index, arrays and list agree."""
        n = self.count
        assert all(len(a) == n for a in (self.page_of, self.seq_of, self.stamp, self.prev, self.next, self.lent))
        assert self.index.count == n
        for slot in range(n):
            assert self.index.get(self.page_of[slot]) == slot
        linked, slot, last = 0, self.head, NIL
        while slot != NIL:
            assert not self.lent[slot] and self.prev[slot] == last
            linked, last, slot = linked + 1, slot, self.next[slot]
        assert last == self.tail and linked + sum(self.lent) == n and sum(self.lent) == self.lent_count
