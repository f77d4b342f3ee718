"""The next chunk of shared page memory populated ahead of need (hoststore.prefault):
exactly what it populates and when, that it changes no page, that nothing is
populated once memory was given back or unmapped, and that a failure costs only speed."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import multiprocessing
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from hoststore.memfd import populate_write
from hoststore.prefault import PIECE_PAGES, Prefaulter
from hoststore.sharedslab import SharedSlab, ZSharedSlab
from pagewire.messages import PAGE_SIZE

CHUNK = 64  # pages: small chunks, so that the next one is quickly reached
HALF = CHUNK // 2
WAIT = 10.0  # seconds: only a broken worker takes this long


def _kernel_populates() -> bool:
    m = mmap.mmap(-1, PAGE_SIZE)
    anchor = ctypes.c_char.from_buffer(m)
    try:
        return populate_write(ctypes.addressof(anchor), PAGE_SIZE) == 0
    finally:
        del anchor
        m.close()


needs_populate = pytest.mark.skipif(not _kernel_populates(), reason="this kernel has no MADV_POPULATE_WRITE")


def data_ranges(slab: SharedSlab) -> list[tuple[int, int]]:
    """The page ranges of the slab's data area that hold memory (SEEK_DATA / SEEK_HOLE)."""
    out, at, end = [], slab.layout.data_offset, slab.layout.size
    while at < end:
        try:
            start = os.lseek(slab.fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        stop = min(os.lseek(slab.fd, start, os.SEEK_HOLE), end)
        out.append(((start - slab.layout.data_offset) // PAGE_SIZE, (stop - slab.layout.data_offset) // PAGE_SIZE))
        at = stop
    return out


def data_of(n: int) -> bytes:
    return random.Random(n).randbytes(PAGE_SIZE)


def eventually(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (state another thread makes true); fails after WAIT."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.001)


class Gate:
    """A madvise that records its calls and holds each until ``go`` is set; then the real one
    (or ``result``)."""

    def __init__(self, result: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self.result = result

    def __call__(self, address: int, length: int) -> int:
        self.calls.append((address, length))
        self.entered.set()
        assert self.go.wait(WAIT)
        return populate_write(address, length) if self.result is None else self.result


def in_thread(fn: Callable[[], object]) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


@pytest.fixture
def slab_with() -> Iterator[Callable[..., SharedSlab]]:
    made: list[SharedSlab] = []

    def make(prefault: Prefaulter | None, slots: int = 1024) -> SharedSlab:
        slab = SharedSlab(slots, slots, chunk_pages=CHUNK, prefault=prefault)
        made.append(slab)
        return slab

    yield make
    for slab in made:
        slab.close()


@needs_populate
def test_the_next_chunk_is_populated_once_the_last_page_is_halfway_into_its_own(slab_with) -> None:
    prefault = Prefaulter()
    slab = slab_with(prefault)
    slab.grow_run(HALF)  # slots 0 .. HALF-1: not yet halfway
    assert prefault.wait_idle(WAIT)
    assert data_ranges(slab) == [] and prefault.populated_bytes == 0
    assert slab.mapped_bytes == CHUNK * PAGE_SIZE
    slab.grow_run(1)  # slot HALF: the next chunk is counted and populated, and nothing else
    assert slab.mapped_bytes == 2 * CHUNK * PAGE_SIZE
    assert prefault.wait_idle(WAIT)
    assert data_ranges(slab) == [(CHUNK, 2 * CHUNK)]
    assert prefault.populated_bytes == CHUNK * PAGE_SIZE
    slab.grow_run(CHUNK)  # halfway into chunk 1: chunk 2
    assert prefault.wait_idle(WAIT)
    assert data_ranges(slab) == [(CHUNK, 3 * CHUNK)]


@needs_populate
def test_the_last_chunk_is_populated_up_to_the_last_slot_and_not_past_it(slab_with) -> None:
    prefault = Prefaulter()
    slots = 2 * CHUNK + PIECE_PAGES + 3  # the last chunk is short, and not a whole number of pieces
    slab = slab_with(prefault, slots=slots)
    slab.grow_run(CHUNK + HALF + 1)
    assert prefault.wait_idle(WAIT)
    assert data_ranges(slab) == [(2 * CHUNK, slots)]
    assert slab.mapped_bytes == slots * PAGE_SIZE
    slab.grow_run(slots - slab.used)  # full: nothing further to ask
    assert prefault.wait_idle(WAIT)
    assert prefault.populated_bytes == (slots - 2 * CHUNK) * PAGE_SIZE


@needs_populate
def test_populating_changes_no_page_written_before_it(slab_with) -> None:
    gate = Gate()
    slab = slab_with(Prefaulter(gate))
    try:
        for n in range(HALF + 1):  # the last makes chunk 1 the next one: its request waits at the gate
            slot = slab.grow()
            slab.write(slot, data_of(n))
        assert gate.entered.wait(WAIT)
        # Pages written into chunk 1 while its first piece waits to be populated.
        for n in range(HALF + 1, CHUNK + PIECE_PAGES):
            slot = slab.grow()
            slab.write(slot, data_of(n))
    finally:
        gate.go.set()
    assert slab.prefault is not None and slab.prefault.wait_idle(WAIT)
    assert len(gate.calls) == CHUNK // PIECE_PAGES
    out = bytearray(PAGE_SIZE)
    for n in range(CHUNK + PIECE_PAGES):
        slab.read_into(n, out)
        assert bytes(out) == data_of(n)


def test_nothing_is_populated_after_the_memory_was_given_back(slab_with) -> None:
    gate = Gate(result=0)
    prefault = Prefaulter(gate)
    slab = slab_with(prefault)
    slab.grow_run(HALF + 1)  # chunk 1 asked for: the worker waits in its first piece, holding the lock
    try:
        assert gate.entered.wait(WAIT)

        def release_all() -> None:
            while slab.used:
                slab.shrink()

        done = in_thread(release_all)
        eventually(lambda: slab.waiting == 1)  # the give-back waits for the piece in progress
        assert not done.is_set()
    finally:
        gate.go.set()  # a failure above must not leave the worker holding the lock for teardown
    assert done.wait(WAIT)
    assert prefault.wait_idle(WAIT)
    assert len(gate.calls) == 1  # the rest of chunk 1 was given back before its turn
    assert slab.populatable(CHUNK * PAGE_SIZE, PAGE_SIZE) is None
    assert slab.mapped_bytes == CHUNK * PAGE_SIZE  # one spare, as without populating


def test_close_waits_for_the_piece_in_progress_and_nothing_follows(slab_with) -> None:
    gate = Gate(result=0)
    prefault = Prefaulter(gate)
    slab = SharedSlab(1024, 1024, chunk_pages=CHUNK, prefault=prefault)
    try:
        slab.grow_run(HALF + 1)
        assert gate.entered.wait(WAIT)
        closed = in_thread(slab.close)
        eventually(lambda: slab.waiting == 1)  # unmapping waits: the worker is in our memory
        assert not closed.is_set()
        gate.go.set()
        assert closed.wait(WAIT)
        assert prefault.wait_idle(WAIT)
        assert len(gate.calls) == 1  # a closed slab's memory is never touched again
    finally:
        gate.go.set()
        slab.close()


def test_a_client_going_back_and_forth_over_a_chunk_start_asks_for_nothing(slab_with) -> None:
    gate = Gate(result=0)
    prefault = Prefaulter(gate)
    slab = slab_with(prefault)
    try:
        slab.grow_run(CHUNK)  # chunk 1 was asked for halfway through chunk 0: the worker holds it
        assert gate.entered.wait(WAIT)
        for _ in range(20):  # one page into chunk 1 and back, as a put and a discard would
            slab.grow()
            assert not prefault._jobs  # chunk 2 is not asked for
            assert slab.mapped_bytes == 2 * CHUNK * PAGE_SIZE
            slab.shrink()
            assert slab.mapped_bytes == 2 * CHUNK * PAGE_SIZE  # and chunk 1 is not given back
    finally:
        gate.go.set()
    assert prefault.wait_idle(WAIT)
    assert len(gate.calls) == CHUNK // PIECE_PAGES  # chunk 1 once


def test_one_request_waits_per_slab_and_a_dropped_slab_is_not_kept_for_it() -> None:
    gate = Gate(result=0)
    prefault = Prefaulter(gate)
    busy = SharedSlab(1024, 1024, chunk_pages=CHUNK, prefault=prefault)
    other = SharedSlab(1024, 1024, chunk_pages=CHUNK, prefault=prefault)
    try:
        busy.grow_run(HALF + 1)
        assert gate.entered.wait(WAIT)  # the worker is held in busy's chunk 1
        other.grow_run(HALF + 1)  # other's chunk 1, then chunk 2 before its turn: one request left
        other.grow_run(CHUNK)
        assert len(prefault._jobs) == 1
        gone, fds = weakref.ref(other), other.fds
        del other  # dropped without a close: the request does not keep it alive
        gc.collect()
        assert gone() is None
        for fd in fds:
            os.close(fd)
        gate.go.set()
        assert prefault.wait_idle(WAIT)
        assert len(gate.calls) == CHUNK // PIECE_PAGES  # busy's chunk only
    finally:
        gate.go.set()
        busy.close()


def test_a_kernel_without_it_turns_prefaulting_off_and_pages_still_go_in(slab_with) -> None:
    gate = Gate(result=errno.EINVAL)
    gate.go.set()
    prefault = Prefaulter(gate)
    slab = slab_with(prefault)
    slab.grow_run(HALF + 1)
    assert prefault.wait_idle(WAIT)
    assert not prefault.enabled
    slab.grow_run(2 * CHUNK)  # more growth asks for nothing now, nor counts a chunk ahead
    assert prefault.wait_idle(WAIT)
    assert len(gate.calls) == 1
    assert slab.mapped_bytes == 3 * CHUNK * PAGE_SIZE  # up to the last page's chunk
    slab.write(100, data_of(100))
    out = bytearray(PAGE_SIZE)
    slab.read_into(100, out)
    assert bytes(out) == data_of(100)


def test_a_failing_request_costs_only_itself(slab_with) -> None:
    calls: list[int] = []

    def flaky(address: int, length: int) -> int:
        calls.append(length)
        if len(calls) == 1:
            raise RuntimeError("a bug in the worker")
        return errno.ENOMEM if len(calls) == 2 else 0

    prefault = Prefaulter(flaky)
    slab = slab_with(prefault, slots=4096)
    for chunk in range(3):  # requests for chunks 1, 2, 3: a bug, ENOMEM, whole
        slab.grow_run(CHUNK)
        assert prefault.wait_idle(WAIT)
    assert prefault.enabled
    assert len(calls) == 2 + CHUNK // PIECE_PAGES
    assert prefault.populated_bytes == CHUNK * PAGE_SIZE


def test_no_thread_to_be_had_costs_only_speed(slab_with, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    prefault = Prefaulter()
    slab = slab_with(prefault)
    first = slab.grow_run(HALF + 1)  # asks: no thread, no exception
    assert first == 0 and slab.used == HALF + 1
    assert not prefault.enabled
    assert slab.mapped_bytes == CHUNK * PAGE_SIZE  # nothing counted that nobody will populate
    slab.write(HALF, data_of(HALF))
    out = bytearray(PAGE_SIZE)
    slab.read_into(HALF, out)
    assert bytes(out) == data_of(HALF)


def test_a_compressed_slab_asks_for_nothing() -> None:
    slab = ZSharedSlab(1000, 300)
    try:
        assert slab.prefault is None
    finally:
        slab.close()


def _give_back_in_child(slab: SharedSlab, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    while slab.used:
        slab.shrink()
    result.put(slab.mapped_bytes)


def test_a_child_forked_while_the_worker_holds_a_slab_can_still_give_memory_back(slab_with) -> None:
    gate = Gate(result=0)
    slab = slab_with(Prefaulter(gate))
    slab.grow_run(HALF + 1)
    assert gate.entered.wait(WAIT)  # the worker holds the slab's lock: a fork now copies it held
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_give_back_in_child, args=(slab, result))
    child.start()
    try:
        assert result.get(timeout=WAIT) == CHUNK * PAGE_SIZE
        child.join(WAIT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        gate.go.set()
