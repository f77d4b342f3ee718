"""Where each page lives: one byte per page in a bytearray.

Whole-batch updates and scans run in C through ``bytes.translate`` and
``re``, so the page path creates no Python object per page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from hoststore.protocol import PageStatus

UNWRITTEN = 0
HOST = 1
BACKING = 2
STATE_NAMES = {UNWRITTEN: "unwritten", HOST: "host", BACKING: "backing"}

# PUT answer byte -> page state: STORED lands in the host, every refusal in the backing file.
STATUS_TO_STATE = bytes(HOST if s == PageStatus.STORED else BACKING for s in range(256))
_IS_HOST = bytes(int(s == HOST) for s in range(256))
_IS_BACKING = bytes(int(s == BACKING) for s in range(256))
_RUN = re.compile(rb"\x00+|\x01+|\x02+")
_REFUSED = re.compile(rb"[^\x00]+")


class PageMap:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.states = bytearray(npages)

    def get(self, page: int) -> int:
        return self.states[page]

    def set_range(self, first: int, count: int, state: int) -> None:
        self.states[first : first + count] = bytes((state,)) * count

    def apply_statuses(self, first: int, statuses: bytes) -> int:
        """Record a PUT's answers; returns how many pages moved from host to backing
        (their host copies were dropped: the store drops an old version it refuses to replace)."""
        n = len(statuses)
        old = bytes(self.states[first : first + n])
        new = statuses.translate(STATUS_TO_STATE)
        self.states[first : first + n] = new
        if HOST not in old:
            return 0
        was_host = int.from_bytes(old.translate(_IS_HOST), "little")
        now_backing = int.from_bytes(new.translate(_IS_BACKING), "little")
        return (was_host & now_backing).bit_count()

    def runs(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(state, first page, page count) for each run of equal states in the range."""
        view = bytes(self.states[first : first + count])
        for m in _RUN.finditer(view):
            yield view[m.start()], first + m.start(), m.end() - m.start()

    def counts(self) -> dict[str, int]:
        host = self.states.count(HOST)
        backing = self.states.count(BACKING)
        return {"host": host, "backing": backing, "unwritten": self.npages - host - backing}


def refused_runs(statuses: bytes) -> Iterator[tuple[int, int]]:
    """(index, count) of each run of refused pages in a PUT answer."""
    for m in _REFUSED.finditer(statuses):
        yield m.start(), m.end() - m.start()
