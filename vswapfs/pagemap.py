"""Where each page lives, which version it is, and what it must read back as.

Three compact arrays indexed by page number (17 bytes per page, no Python
object per page): the state (one byte), the sequence number of the write that
produced the current version, and that version's checksum
(``vswapfs.integrity``).  The store is never trusted to say what a page is:
the sequence number and checksum here decide.

Same-filled pages (every 8-byte word of the page equal, zero pages included),
as zram keeps them: state SAME, and ``sums`` holds the fill word instead of a
checksum (the page's first 8 bytes as a native-endian unsigned 64-bit word).
Such a page lives in the map alone, neither in the store nor in the backing
file; there is nothing to check, since the map is the page.  Its ``seqs``
entry still names the write that produced it.

Whole-batch updates and scans run in C (``bytes.translate``, ``re``, slice
assignment, ``map`` over strided memoryviews).
"""

from __future__ import annotations

import functools
import re
import sys
from array import array
from collections.abc import Iterator
from operator import eq

from pagewire.messages import PAGE_SIZE, PageStatus

UNWRITTEN = 0
HOST = 1  # only in the store (write-back)
BACKING = 2  # only in the backing file
LOST = 3  # its only copy is gone: reads fail at once until it is rewritten
HOST_WT = 4  # in the store and in the backing file (write-through): the store copy is a cache
SAME = 5  # same-filled: only in the map, its fill word in ``sums`` (neither store nor backing file)
STATE_NAMES = {UNWRITTEN: "unwritten", HOST: "host", BACKING: "backing", LOST: "lost_now",
               HOST_WT: "host_and_backing", SAME: "same_filled"}
IN_STORE = (HOST, HOST_WT)

# PUT answer byte -> page state, for each way of writing.
STORED_TO_HOST = bytes(HOST if s == PageStatus.STORED else BACKING for s in range(256))
STORED_TO_HOST_WT = bytes(HOST_WT if s == PageStatus.STORED else BACKING for s in range(256))
_IS = [bytes(int(s == state) for s in range(256)) for state in range(256)]
_RUN = re.compile(rb"(.)\1*", re.S)
_REFUSED = re.compile(rb"[^\x00]+")
_ONES = re.compile(rb"\x01+")
_WORDS = PAGE_SIZE // 8
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_RUN_PAGES = 16  # zero candidates are compared this many at a time
_ZERO_RUN = bytes(_ZERO_RUN_PAGES * PAGE_SIZE)


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

    def store_runs_now_same(self, first: int, states: bytes) -> list[tuple[int, int]]:
        """(first page, count) of each run of pages the map places in the store that
        ``states``, about to be recorded at ``first``, makes same-filled: the store's
        copies of them are now stale and must be dropped."""
        if SAME not in states:
            return []
        old = bytes(self.states[first : first + len(states)])
        if HOST not in old and HOST_WT not in old:
            return []
        mask = (_mask(old, HOST) | _mask(old, HOST_WT)) & _mask(states, SAME)
        flags = mask.to_bytes(len(states), "little")
        return [(first + m.start(), m.end() - m.start()) for m in _ONES.finditer(flags)]

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


def same_filled(data: memoryview) -> dict[int, int]:
    """{index: fill word} of the pages of ``data`` whose every 8-byte word is equal.

    This runs on every swap-out, so the common answer (none) must be cheap: one
    C pass compares the first two words of every page (strided memoryviews,
    ``map(operator.eq, ...)``), which rules out nearly every page of real data
    for well under 0.1 µs a page.  Only the candidates are checked in full, by
    ``memcmp`` against a page of their fill word (``bytes.startswith`` takes
    the memoryview: no copy); runs of zero pages 16 at a time, until one fails."""
    words = data.cast("Q")
    firsts = words[0::_WORDS]
    flags = bytes(map(eq, firsts, words[1::_WORDS]))
    if 1 not in flags:
        return {}
    found: dict[int, int] = {}
    for m in _ONES.finditer(flags):
        start, end = m.span()
        while end - start > 1:
            stop = min(end, start + _ZERO_RUN_PAGES)
            if any(firsts[start:stop]) or not _ZERO_RUN.startswith(data[start * PAGE_SIZE : stop * PAGE_SIZE]):
                break
            found.update(dict.fromkeys(range(start, stop), 0))
            start = stop
        for i in range(start, end):  # the rest one page at a time: two more words, then every byte
            at = i * _WORDS
            word = words[at]
            if words[at + _WORDS - 1] == word and words[at + _WORDS // 2] == word and \
                    filled_page(word).startswith(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]):
                found[i] = word
    return found


def filled_page(word: int) -> bytes:
    """The page whose every 8-byte word is ``word`` (as ``same_filled`` reads words)."""
    return _ZERO_PAGE if not word else _nonzero_page(word)


@functools.lru_cache(maxsize=16)
def _nonzero_page(word: int) -> bytes:
    return word.to_bytes(8, sys.byteorder) * _WORDS
