"""Model-based test of the page rules: hypothesis drives the pager against the
fake store through writes (of data, zero and other same-filled pages, mixed in
one batch), reads, discards, refusals, stalls with late arrivals, disconnects,
store death, hand-backs, drains and a store that damages pages, in write-back
and write-through mode; every read is checked against a plain dict.

What a read may return:
* a page never written (or discarded): zeros;
* a same-filled page: its fill, whatever happens to the store (it lives in the map);
* a page whose only copy died with the store: EIO, and never anything else;
* a page whose store copy was damaged: its data, or EIO (never other bytes);
  in write-through mode always its data;
* any other page: exactly what was last written.

The pager runs in a trio loop on a helper thread; each rule calls into it and
waits until every task (the store's wire, the orphan task) has settled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import trio
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagewire.messages import PAGE_SIZE, HandBackCause
from vswapfs.backing import Backing
from vswapfs.pagemap import HOST, HOST_WT, IN_STORE, SAME
from vswapfs.pager import Pager, PageUnavailable

from .conftest import disk_base
from .fakestore import FakeStore

NPAGES = 24


def data_for(page: int, version: int, kind: str = "data") -> bytes:
    """A page naming its number and version ("data", not same-filled: its last word
    differs), or a same-filled page: "zero", or "fill" (a word naming the version)."""
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "fill":
        return (version.to_bytes(4, "little") * 2) * (PAGE_SIZE // 8)
    return (page.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8 - 1) + b"not same"


def is_same_filled(data: bytes) -> bool:
    return data == data[:8] * (PAGE_SIZE // 8)


class TrioThread:
    """A trio loop (on a mock clock that jumps when everything waits) on a thread of its own."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await trio.sleep_forever()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))

    def run(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def run_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def start_soon(self, afn, *args) -> None:
        trio.from_thread.run_sync(self.nursery.start_soon, afn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self._thread.join(10)


class PagerMachine(RuleBasedStateMachine):
    pages = st.integers(0, NPAGES - 1)
    kinds = st.lists(st.sampled_from(["data", "data", "zero", "fill"]), min_size=1, max_size=6)  # half data

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vswapfs-model-", dir=disk_base())
        self.backing = Backing.open(os.path.join(self.dir, "backing"), NPAGES * PAGE_SIZE)
        self.trio = TrioThread()
        self.model: dict[int, bytes] = {}  # page -> what was last written
        self.lost: set[int] = set()  # pages whose only copy died with the store
        self.suspect: set[int] = set()  # pages whose store copy was damaged
        self.version = 0
        self.pager: Pager | None = None

    @initialize(writethrough=st.booleans(), capacity=st.sampled_from([4, 12, NPAGES]))
    def start(self, writethrough: bool, capacity: int) -> None:
        self.store = FakeStore(NPAGES, capacity)
        self.pager = Pager(self.backing, self.store, write_timeout=0.5, read_timeout=2.0,
                           writethrough=writethrough)
        self.trio.start_soon(self.pager.drop_orphans)

    def teardown(self) -> None:
        self.trio.close()
        self.backing.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------

    async def _settled(self) -> None:
        """Until the store's wire is served and the orphan task has nothing left to do."""
        for _ in range(1000):
            await trio.testing.wait_all_tasks_blocked()
            if not self.store.up or self.store.stalled:
                return
            if not self.store._wire and not self.pager.orphans_pending:
                await trio.testing.wait_all_tasks_blocked()
                return
            await trio.sleep(0.01)
        raise AssertionError(f"never settled: wire {len(self.store._wire)}, orphans {self.pager.orphans_pending}")

    def call(self, afn, *args):
        async def go():
            try:
                return await afn(*args)
            finally:
                await self._settled()

        return self.trio.run(go)

    @property
    def quiet(self) -> bool:
        return self.store.up and not self.store.stalled

    def _rewritten(self, pages: range) -> None:
        for p in pages:
            self.lost.discard(p)
            self.suspect.discard(p)

    # -- the device ---------------------------------------------------------------------

    @rule(first=pages, kinds=kinds)
    def write(self, first: int, kinds: list[str]) -> None:
        kinds = kinds[: NPAGES - first]
        self.version += 1
        pages = [data_for(first + i, self.version, kind) for i, kind in enumerate(kinds)]
        data = b"".join(pages)
        assert self.call(self.pager.write, first * PAGE_SIZE, data) == len(data)
        for i, kind in enumerate(kinds):
            self.model[first + i] = pages[i]
            if kind != "data":
                event(f"wrote a same-filled page ({kind})")
                assert self.pager.map.get(first + i) == SAME
        if len(set(kinds)) > 1 and "data" in kinds:
            event("wrote a batch mixing same-filled pages and data")
        self._rewritten(range(first, first + len(kinds)))

    @precondition(lambda self: self.quiet)
    @rule(first=pages, kinds=kinds)
    def write_as_the_store_dies(self, first: int, kinds: list[str]) -> None:
        """The store answers the next request and dies at once, a new one taking its
        place: a write in flight must still end up somewhere that survives.  (A write
        of same-filled pages alone may send nothing, or only a drop request.)"""
        would_be_lost = self._only_in_store()
        instances = self.store.instances
        self.store.die_after_next_answer = True
        self.write(first, kinds)
        self.store.die_after_next_answer = False
        if self.store.instances == instances:
            event("a write sent nothing, and the store lived on")
            return
        self._lose(would_be_lost - set(range(first, first + len(kinds))))
        self.suspect.clear()
        event("a write raced the store's death")

    @precondition(lambda self: self.quiet)
    @rule(first=pages, n=st.integers(1, 8))
    def read(self, first: int, n: int) -> None:
        n = min(n, NPAGES - first)
        expected = b"".join(self.model.get(p, bytes(PAGE_SIZE)) for p in range(first, first + n))
        try:
            got = self.call(self.pager.read, first * PAGE_SIZE, n * PAGE_SIZE)
        except PageUnavailable:
            event("read: EIO")
            may_fail = self.lost | (self.suspect if not self.pager.writethrough else set())
            assert may_fail & set(range(first, first + n)), f"EIO reading {first}+{n}, nothing there was lost"
            return
        assert not self.lost & set(range(first, first + n)), "a lost page read back as data"
        assert got == expected, "wrong data"
        if self.suspect & set(range(first, first + n)):
            event("read: a damaged page read back fine")

    @precondition(lambda self: self.quiet)
    @rule()
    def read_every_page(self) -> None:
        """Each page on its own: a lost page must fail, a damaged one may (never with other bytes)."""
        for p in range(NPAGES):
            self.read(p, 1)

    @rule(first=pages, n=st.integers(1, 8))
    def discard(self, first: int, n: int) -> None:
        n = min(n, NPAGES - first)
        self.call(self.pager.discard, first * PAGE_SIZE, n * PAGE_SIZE)
        for p in range(first, first + n):
            self.model.pop(p, None)
        self._rewritten(range(first, first + n))

    # -- the store's moods ------------------------------------------------------------------

    @rule(high=st.booleans())
    def pressure(self, high: bool) -> None:
        self.store.pressure = 95.0 if high else 10.0

    @rule(every=st.sampled_from([0, 2, 3]))
    def refuse_every(self, every: int) -> None:
        self.store.refuse_every = every

    @precondition(lambda self: self.quiet)
    @rule()
    def stall(self) -> None:
        """Requests stay on the wire: writes time out and go to the backing file."""
        self.trio.run_sync(setattr, self.store, "stalled", True)

    @precondition(lambda self: self.store.up and self.store.stalled)
    @rule()
    def release(self) -> None:
        """The stalled requests arrive late, in order, followed by their invalidations."""
        self.trio.run_sync(self.store.release)
        self.call(trio.sleep, 0)

    @precondition(lambda self: self.store.up)
    @rule(served=st.integers(0, 3))
    def disconnect(self, served: int) -> None:
        self.trio.run_sync(self.store.disconnect, served)

    @precondition(lambda self: not self.store.up)
    @rule()
    def reconnect(self) -> None:
        def back() -> None:
            self.store.stalled = False
            self.store.reconnect()

        self.trio.run_sync(back)
        self.call(trio.sleep, 0)

    @rule()
    def kill_store(self) -> None:
        """The store dies: pages whose newest version only it had are lost (in write-back)."""
        self._lose(self._only_in_store())
        self.trio.run_sync(self.store.kill)
        self.suspect.clear()

    def _lose(self, pages: set[int]) -> None:
        if pages:
            event("store death lost a page")
        self.lost |= pages

    def _only_in_store(self) -> set[int]:
        """Pages that would die with the store: their newest version is not in the backing
        file, and they are not same-filled (those live in the page map)."""
        only = set()
        for p, expected in self.model.items():
            if is_same_filled(expected) or p in self.lost:
                continue
            raw = bytearray(PAGE_SIZE)
            self.backing.pread_into(p * PAGE_SIZE, memoryview(raw))
            if bytes(raw) != expected:
                assert not self.pager.writethrough, f"page {p} missing from the backing file in write-through"
                only.add(p)
        return only

    @precondition(lambda self: self.quiet)
    @rule(limit=st.integers(1, 10))
    def hand_back(self, limit: int) -> None:
        self.call(self.store.hand_back, limit)

    @precondition(lambda self: self.quiet)
    @rule()
    def drain(self) -> None:
        self.call(self.store.hand_back, None, HandBackCause.DRAIN)
        assert self.store.pages_stored == self.store.client.lent_count == 0

    @precondition(lambda self: self.quiet and self.model)  # pages written: the model's, not the store's
    @rule(pick=pages)
    def damage_store_copy(self, pick: int) -> None:
        """Flip a bit of the store's copy of a page: the first stored at or after ``pick``.
        (What is drawn, and whether the rule may run, must not depend on what the store
        holds: that depends on how the pager's tasks were scheduled, and hypothesis
        replays an example only if its draws come out the same.)"""
        client = self.store.client
        stored = sorted(client.page_of[: client.count])
        if not stored:
            return
        p = next((q for q in stored if q >= pick), stored[0])

        def damage() -> bool:
            slot = self.store.client.index.get(p)
            if slot < 0:
                return False
            view = self.store.client.slab.view(slot)
            view[17] ^= 0x40
            view.release()
            return True

        if self.trio.run_sync(damage):
            self.suspect.add(p)
            event("damaged a stored page")

    # -- what must always hold ----------------------------------------------------------------

    @invariant()
    def store_is_consistent(self) -> None:
        if self.pager is not None:
            self.store.client.check()
            assert self.pager.locks.held == 0

    @invariant()
    def the_map_points_only_at_pages_the_store_has(self) -> None:
        """When all is quiet, every page the map places in the store is there, in that version."""
        if self.pager is None or not self.quiet:
            return
        states, seqs = self.pager.map.states, self.pager.map.seqs
        client = self.store.client
        for p in range(NPAGES):
            if states[p] in IN_STORE:
                slot = client.index.get(p)
                assert slot >= 0 and client.seq_of[slot] == seqs[p], f"page {p}: map says store, store disagrees"

    @invariant()
    def nothing_lingers_in_the_store(self) -> None:
        """When all is quiet, the store holds exactly the pages the map places there:
        timed-out puts that landed late, and old copies, have been dropped."""
        if self.pager is None or not self.quiet or self.store._wire:
            return
        if self.pager.orphans_pending:
            return
        in_store = sum(self.pager.map.states.count(state) for state in IN_STORE)
        assert self.store.pages_stored == in_store, "the store holds pages the map does not place there"
        states, index = self.pager.map.states, self.store.client.index
        for p in range(NPAGES):
            if states[p] == SAME:
                assert index.get(p) < 0, f"same-filled page {p}: the store still holds an old copy"

    @invariant()
    def lost_pages_are_marked(self) -> None:
        if self.pager is None or not self.store.up:
            return
        states = self.pager.map.states
        for p in self.lost:
            assert states[p] not in (HOST, HOST_WT), f"lost page {p} still placed in the store"


PagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("VSWAPFS_MODEL_EXAMPLES", "300")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPagerModel = PagerMachine.TestCase
