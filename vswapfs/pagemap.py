"""Where each page lives, which version it is, and what it must read back as.

Three compact arrays indexed by page number (17 bytes per page, no Python
object per page): the state (one byte), the sequence number of the write that
produced the current version, and that version's checksum
(``vswapfs.integrity``).  The store is never trusted to say what a page is:
the sequence number and checksum here decide.

Whole-batch updates and scans run in C (``bytes.translate``, ``re``, slice
assignment).
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator

from hoststore.messages import PageStatus

UNWRITTEN = 0
HOST = 1  # only in the store (write-back)
BACKING = 2  # only in the backing file
LOST = 3  # its only copy is gone: reads fail at once until it is rewritten
HOST_WT = 4  # in the store and in the backing file (write-through): the store copy is a cache
STATE_NAMES = {UNWRITTEN: "unwritten", HOST: "host", BACKING: "backing", LOST: "lost_now",
               HOST_WT: "host_and_backing"}
IN_STORE = (HOST, HOST_WT)

# PUT answer byte -> page state, for each way of writing.
STORED_TO_HOST = bytes(HOST if s == PageStatus.STORED else BACKING for s in range(256))
STORED_TO_HOST_WT = bytes(HOST_WT if s == PageStatus.STORED else BACKING for s in range(256))
_IS = [bytes(int(s == state) for s in range(256)) for state in range(256)]
_RUN = re.compile(rb"(.)\1*", re.S)
_REFUSED = re.compile(rb"[^\x00]+")


class PageMap:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.states = bytearray(npages)
        self.seqs = array("Q", bytes(8 * npages))
        self.sums = array("Q", bytes(8 * npages))

    def get(self, page: int) -> int:
        return self.states[page]

    def set_range(self, first: int, count: int, state: int) -> None:
        self.states[first : first + count] = bytes((state,)) * count

    def record(self, first: int, states: bytes, seq: int, sums: array) -> int:
        """A write's outcome: new states, its sequence number and checksums.  Returns
        how many pages moved from the store to the backing file (their store copies
        were dropped: the store drops an old version it refuses to replace)."""
        n = len(states)
        old = bytes(self.states[first : first + n])
        self.states[first : first + n] = states
        self.seqs[first : first + n] = array("Q", [seq]) * n
        self.sums[first : first + n] = sums
        if HOST not in old and HOST_WT not in old:
            return 0
        was_in_store = _mask(old, HOST) | _mask(old, HOST_WT)
        now_backing = _mask(states, BACKING) | _mask(states, LOST)
        return (was_in_store & now_backing).bit_count()

    def replace_state(self, old: int, new: int) -> int:
        """Every page in state ``old`` moves to ``new``; returns how many did."""
        count = self.states.count(old)
        if count:
            table = bytearray(range(256))
            table[old] = new
            self.states[:] = self.states.translate(table)
        return count

    def runs(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(state, first page, page count) for each run of equal states in the range."""
        view = bytes(self.states[first : first + count])
        for m in _RUN.finditer(view):
            yield view[m.start()], first + m.start(), m.end() - m.start()

    def counts(self) -> dict[str, int]:
        return {name: self.states.count(state) for state, name in STATE_NAMES.items()}


def _mask(states: bytes, state: int) -> int:
    return int.from_bytes(states.translate(_IS[state]), "little")


def refused_runs(statuses: bytes) -> Iterator[tuple[int, int]]:
    """(index, count) of each run of refused pages in a PUT answer."""
    for m in _REFUSED.finditer(statuses):
        yield m.start(), m.end() - m.start()
