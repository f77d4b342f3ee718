from __future__ import annotations

from hoststore.protocol import PageStatus
from vswapfs.pagemap import BACKING, HOST, UNWRITTEN, PageMap, refused_runs


def test_apply_statuses_and_runs() -> None:
    m = PageMap(10)
    stale = m.apply_statuses(2, bytes([PageStatus.STORED, PageStatus.STORED, PageStatus.REFUSED_PRESSURE]))
    assert stale == 0
    assert list(m.runs(0, 10)) == [(UNWRITTEN, 0, 2), (HOST, 2, 2), (BACKING, 4, 1), (UNWRITTEN, 5, 5)]
    # Page 3 was in the host; its new version is refused: one stale copy dropped.
    stale = m.apply_statuses(3, bytes([PageStatus.REFUSED_CAPACITY, PageStatus.STORED]))
    assert stale == 1
    assert m.counts() == {"host": 2, "backing": 1, "unwritten": 7}
    assert (m.get(3), m.get(4)) == (BACKING, HOST)


def test_refused_runs() -> None:
    s = bytes([0, 1, 1, 0, 0, 4, 0, 2])
    assert list(refused_runs(s)) == [(1, 2), (5, 1), (7, 1)]
    assert list(refused_runs(bytes(5))) == []
