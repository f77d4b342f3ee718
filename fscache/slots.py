"""The cache's slots: the pages of the client device the cache presents to the store.

The store keys pages by a client's device page number, so the cache gives each
cached file page a slot, a device page number of its own, and remembers per slot
which file page it holds and the version (the put's sequence number) and checksum
it was offered at.  Slots are handed out as a ring, oldest first: when every slot
is taken, the oldest is reused, and the file page it held is forgotten.  A slot is
only ever read back after its version and checksum match what is recorded here,
so the copy of an earlier owner of a slot can never be returned for a later one.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

FREE = 0  # no file owns the slot (file numbers start at 1)


class Slots:
    def __init__(self, count: int) -> None:
        if count <= 0:
            raise ValueError("a cache needs at least one slot")
        self.count = count
        self.owner = array("Q", bytes(8 * count))  # the file number holding each slot, or FREE
        self.index = array("Q", bytes(8 * count))  # the page of that file
        self.seq = array("Q", bytes(8 * count))  # the version the page was offered at
        self.sum = array("Q", bytes(8 * count))  # its checksum (vswapfs.integrity: slot, seq, data)
        self._hand = 0
        self.used = 0

    def take(self, n: int) -> Iterator[tuple[int, int]]:
        """Up to ``n`` slots in runs ``(first, count)`` of consecutive slots, oldest first.
        A slot taken may still have an owner (``owner`` not FREE): the caller forgets that
        owner's page and frees the slot before reusing it."""
        n = min(n, self.count)
        while n:
            first = self._hand
            run = min(n, self.count - first)
            self._hand = (first + run) % self.count
            n -= run
            yield first, run

    def assign(self, slot: int, owner: int, index: int, seq: int, checksum: int) -> None:
        if self.owner[slot] == FREE:
            self.used += 1
        self.owner[slot] = owner
        self.index[slot] = index
        self.seq[slot] = seq
        self.sum[slot] = checksum

    def free(self, slot: int) -> None:
        if self.owner[slot] != FREE:
            self.used -= 1
            self.owner[slot] = FREE
