from __future__ import annotations

from array import array

from hoststore.messages import PageStatus
from vswapfs.pagemap import BACKING, HOST, HOST_WT, LOST, STORED_TO_HOST, UNWRITTEN, PageMap, refused_runs

S = PageStatus


def test_record_and_runs() -> None:
    m = PageMap(10)
    states = bytes([S.STORED, S.STORED, S.REFUSED_PRESSURE]).translate(STORED_TO_HOST)
    assert m.record(2, states, 5, array("Q", [1, 2, 3])) == 0
    assert list(m.runs(0, 10)) == [(UNWRITTEN, 0, 2), (HOST, 2, 2), (BACKING, 4, 1), (UNWRITTEN, 5, 5)]
    assert list(m.seqs[2:5]) == [5, 5, 5] and list(m.sums[2:5]) == [1, 2, 3]
    # Page 3 was in the host; its new version is refused: one stale copy dropped.
    states = bytes([S.REFUSED_CAPACITY, S.STORED]).translate(STORED_TO_HOST)
    assert m.record(3, states, 6, array("Q", [9, 9])) == 1
    assert (m.get(3), m.get(4)) == (BACKING, HOST)
    assert m.counts() == {"unwritten": 7, "host": 2, "backing": 1, "lost_now": 0, "host_and_backing": 0}


def test_replace_state() -> None:
    m = PageMap(6)
    m.set_range(0, 2, HOST)
    m.set_range(2, 2, HOST_WT)
    assert m.replace_state(HOST, LOST) == 2 and m.replace_state(HOST_WT, BACKING) == 2
    assert bytes(m.states) == bytes([LOST, LOST, BACKING, BACKING, UNWRITTEN, UNWRITTEN])
    assert m.replace_state(HOST, LOST) == 0


def test_refused_runs() -> None:
    s = bytes([0, 1, 1, 0, 0, 4, 0, 2])
    assert list(refused_runs(s)) == [(1, 2), (5, 1), (7, 1)]
    assert list(refused_runs(bytes(5))) == []
