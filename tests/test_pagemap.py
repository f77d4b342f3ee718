from __future__ import annotations

import os
import sys
from array import array

import pytest

from pagewire.messages import PAGE_SIZE, PageStatus
from vswapfs.pagemap import (
    BACKING,
    HOST,
    HOST_WT,
    LOST,
    SAME,
    STORED_TO_HOST,
    UNWRITTEN,
    PageMap,
    filled_page,
    refused_runs,
    same_filled,
)

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
    assert m.counts() == {"unwritten": 7, "host": 2, "backing": 1, "lost_now": 0, "host_and_backing": 0,
                          "same_filled": 0}


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


def word_page(word: bytes) -> bytes:
    return word * (PAGE_SIZE // 8)


def native(word: bytes) -> int:
    return int.from_bytes(word, sys.byteorder)


def test_same_filled_finds_exactly_the_pages_of_one_repeated_word() -> None:
    rnd = os.urandom(PAGE_SIZE)
    almost = bytearray(PAGE_SIZE)
    almost[PAGE_SIZE // 3] = 1  # differs in a word no screen looks at: only the full check sees it
    last = bytes(PAGE_SIZE - 1) + b"\x01"  # differs only in the last byte
    shifted = b"\x01" + bytes(PAGE_SIZE - 1)  # first word differs from the second
    pages = [bytes(PAGE_SIZE), rnd, word_page(b"\xff" * 8), bytes(almost), word_page(b"12345678"),
             last, shifted, word_page(b"abababab"), bytes(PAGE_SIZE)]
    found = same_filled(memoryview(b"".join(pages)))
    assert found == {0: 0, 2: native(b"\xff" * 8), 4: native(b"12345678"), 7: native(b"abababab"), 8: 0}
    for i, word in found.items():
        assert filled_page(word) == pages[i]
    unaligned = memoryview(b"xyz" + b"".join(pages))[3:]  # a buffer need not be 8-byte aligned
    assert same_filled(unaligned) == found


@pytest.mark.parametrize("data", [os.urandom(64 * PAGE_SIZE), b"0123456789abcdef" * (64 * PAGE_SIZE // 16)])
def test_no_same_filled_pages(data: bytes) -> None:
    assert same_filled(memoryview(data)) == {}


def test_store_runs_now_same() -> None:
    m = PageMap(10)
    m.set_range(0, 4, HOST)
    m.set_range(4, 2, HOST_WT)
    m.set_range(6, 2, BACKING)
    # Pages 1, 2 (host), 4 (host and backing), 6 (backing) and 8 (unwritten) become same-filled.
    new = bytes([HOST, SAME, SAME, BACKING, SAME, HOST, SAME, HOST, SAME])
    assert m.store_runs_now_same(0, new) == [(1, 2), (4, 1)]
    assert m.store_runs_now_same(0, bytes([HOST] * 8)) == []
    assert m.store_runs_now_same(6, bytes([SAME] * 4)) == []  # nothing there was in the store


def test_same_filled_long_runs_of_zero_candidates() -> None:
    """Zero candidates are compared 16 pages at a time; one bad page falls back to page by page."""
    pages = [bytearray(PAGE_SIZE) for _ in range(40)]
    pages[5][PAGE_SIZE // 3] = 1
    pages[20][-1] = 1
    pages[33][:] = word_page(b"\xff" * 8)
    found = same_filled(memoryview(b"".join(pages)))
    expected = {i: 0 for i in range(40) if i not in (5, 20)}
    expected[33] = native(b"\xff" * 8)
    assert found == expected
