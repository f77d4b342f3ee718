"""A drain is bounded by progress, not by a clock: real sockets and real pagers,
on trio's fake clock (moved by the work: a slow disk is a sleep, and a drain of
many seconds takes a fraction of one).

``--drain-timeout`` (T) sets the drain's minimum rate: a client is waited for
while it takes its pages back at an average of at least one hand-back batch
(256 pages) per T.  Each page taken moves its deadline T/256 on, to at most T
from now; it starts at T from the drain's start, and once T from its return.
So a client away for longer than T is given up on, and so is one that takes
nothing, or takes one page of each batch and answers FAILED for the rest.  One
that keeps taking pages at that rate, however slow its disk, is drained to the
end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from pagewire.address import Address
from pagewire.messages import PAGE_SIZE, Drain, HandBack, TakeStatus
from hoststore.server import Server, ServerConfig, open_listener
from hoststore.store import HostCounter
from vswapfs.backing import Backing
from vswapfs.hostclient import HostClient, query
from vswapfs.pager import Pager

from .test_rpc import new_store

BATCH = 256  # pages per hand-back (ServerConfig's default)
FOREVER = 1e9  # a query's wait for the drain's report: as long as it takes


def data(n: int) -> bytes:
    """Page ``n``'s contents: two different words, so it is not same-filled and goes to the store."""
    return (n.to_bytes(8, "little") + b"drained!") * (PAGE_SIZE // 16)


async def start_server(nursery: trio.Nursery, path: str, capacity: int, **config) -> tuple[Address, Server]:
    """A store under no memory pressure (whose loop then need not wake the fake clock every 50 ms)."""
    listener = await open_listener(Address("unix", path=path))
    server = Server(new_store(capacity=capacity), ServerConfig(handback_interval=60.0, **config))
    [address] = await nursery.start(server.serve, [listener])
    return address, server


@pytest.fixture
def backings(disk_dir: str) -> Iterator[Backings]:
    """Where the tests' pagers keep their backing files; every one is closed at teardown,
    whatever the test did."""
    opened = Backings(disk_dir)
    try:
        yield opened
    finally:
        for backing in opened.files:
            backing.close()


@dataclass
class Backings:
    directory: str
    files: list[Backing] = field(default_factory=list)

    def open(self, name: str, size: int) -> Backing:
        backing = Backing.open(f"{self.directory}/{name}", size)
        self.files.append(backing)
        return backing


async def pager_on(nursery: trio.Nursery, address: Address, name: str, npages: int, backings: Backings
                   ) -> tuple[HostClient, Pager]:
    """A HostClient and a Pager on a real backing file, with ``npages`` pages written to the store."""
    backing = backings.open(name, npages * PAGE_SIZE)
    client = HostClient(address, name, npages * PAGE_SIZE, backoff_min=0.01, backoff_max=0.05)
    pager = Pager(backing, client, write_timeout=30.0)
    await nursery.start(client.run)
    for first in range(0, npages, BATCH):
        count = min(BATCH, npages - first)
        await pager.write(first * PAGE_SIZE, b"".join(data(first + i) for i in range(count)))
    assert pager.map.counts()["host"] == npages
    return client, pager


def slow_disk(pager: Pager, seconds: float, taken_at: list[float] | None = None):
    """The pager's own hand-back, each batch taking ``seconds`` longer (a slow backing
    disk); the time each batch was answered goes to ``taken_at``."""

    async def take_back(handback: HandBack) -> bytes:
        await trio.sleep(seconds)
        statuses = await pager.take_back(handback)
        if taken_at is not None:
            taken_at.append(trio.current_time())
        return statuses

    return take_back


async def read_back(pager: Pager, npages: int) -> None:
    """Every page reads back as written (from the backing file now: the store is gone)."""
    for first in range(0, npages, BATCH):
        count = min(BATCH, npages - first)
        got = await pager.read(first * PAGE_SIZE, count * PAGE_SIZE)
        assert got == b"".join(data(first + i) for i in range(count)), first


async def test_a_slow_client_that_keeps_taking_pages_is_drained_to_the_end(
        autojump_clock: trio.testing.MockClock, tmp_path, backings: Backings) -> None:
    """The issue's reproduction: 4096 pages, each batch of 256 taken in 0.4 s by a slow
    disk (two at a time): 3.2 s in all against a 1 s timeout.  Every page comes back."""
    npages = 4096
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s"), npages, drain_timeout=1.0)
        client, pager = await pager_on(nursery, address, "slow", npages, backings)
        client.set_handlers(slow_disk(pager, 0.4), pager.pages_lost)
        start = trio.current_time()
        report = await query(address, Drain(), timeout=FOREVER)
        assert trio.current_time() - start > 3 * server.config.drain_timeout  # the timeout would have bitten
        assert report == {"handed_back": {"slow": npages}, "dropped": {}}
        store = server.store
        assert store.pages == 0 and store.counters[HostCounter.HANDED_BACK_DRAIN] == npages
        assert store.counters[HostCounter.DRAIN_GAVE_UP] == 0
        assert pager.map.counts()["backing"] == npages
        await read_back(pager, npages)
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_taking_pages_is_given_up_one_timeout_after_its_last(
        autojump_clock: trio.testing.MockClock, tmp_path, backings: Backings) -> None:
    """A connected client takes three batches (the last at 0.8 s) and then answers no
    more; another is away and never comes back.  The drain gives up on the away one at
    1 s, on the stalled one 1 s after its last page taken, and not a moment before:
    its hand-backs in flight are called off and what it did not take stays listed."""
    timeout = 1.0
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s"), 4096, drain_timeout=timeout)
        store = server.store
        async with trio.open_nursery() as away:
            await pager_on(away, address, "away", 300, backings)
            away.cancel_scope.cancel()
        with trio.fail_after(5):
            while store.clients["away"].connected:
                await trio.sleep(0.01)
        client, pager = await pager_on(nursery, address, "stuck", 2048, backings)
        taken_at: list[float] = []
        take = slow_disk(pager, 0.4, taken_at)
        calls = 0

        async def three_then_nothing(handback: HandBack) -> bytes:
            nonlocal calls
            calls += 1
            if calls > 3:  # the first three batches (two in hand at once: 0.4 s, 0.4 s, 0.8 s), then silence
                await trio.sleep_forever()
            return await take(handback)

        client.set_handlers(three_then_nothing, pager.pages_lost)
        start = trio.current_time()
        report = await query(address, Drain(), timeout=FOREVER)
        end = trio.current_time()
        assert len(taken_at) == 3 and taken_at[-1] - start == pytest.approx(0.8, abs=0.01)
        assert end - taken_at[-1] == pytest.approx(timeout, abs=0.05)  # bounded by the stall, from its start
        assert report == {"handed_back": {"stuck": 3 * BATCH, "away": 0},
                          "dropped": {"stuck": 2048 - 3 * BATCH, "away": 300}}
        assert store.counters[HostCounter.DRAIN_GAVE_UP] == 2
        assert store.clients["stuck"].count == 2048 - 3 * BATCH and store.clients["stuck"].lent_count == 0
        assert pager.map.counts()["backing"] == 3 * BATCH
        nursery.cancel_scope.cancel()


async def test_an_away_client_that_comes_back_late_is_drained_to_the_end(
        autojump_clock: trio.testing.MockClock, tmp_path, backings: Backings) -> None:
    """Away when the drain starts, back 1.5 s into a 2 s timeout, then 1.2 s to take its
    1024 pages: all of them come back; one that never returns is dropped at 2 s."""
    timeout = 2.0
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s"), 2048, drain_timeout=timeout)
        store = server.store
        async with trio.open_nursery() as away:
            back, pager = await pager_on(away, address, "back", 1024, backings)
            await pager_on(away, address, "gone", 7, backings)
            away.cancel_scope.cancel()  # both disconnect
        with trio.fail_after(5):
            while store.connections_active:
                await trio.sleep(0.01)
        report: dict = {}
        drained = trio.Event()

        async def drain() -> None:
            report.update(await query(address, Drain(), timeout=FOREVER))
            drained.set()

        start = trio.current_time()
        nursery.start_soon(drain)
        await trio.sleep(1.5)  # the scenario: away for three quarters of the timeout
        assert store.pages == 1024 + 7 and not report
        back.set_handlers(slow_disk(pager, 0.6), pager.pages_lost)
        await nursery.start(back.run)  # "back" reconnects, proves who it is, takes its pages
        with trio.fail_after(60):
            await drained.wait()
        assert trio.current_time() - start > timeout + 0.5
        assert report == {"handed_back": {"back": 1024, "gone": 0}, "dropped": {"gone": 7}}
        assert back.hello_answer.resumed and store.counters[HostCounter.DRAIN_GAVE_UP] == 1
        await read_back(pager, 1024)
        nursery.cancel_scope.cancel()


async def test_a_client_that_takes_one_page_a_batch_and_fails_the_rest_is_given_up_on(
        autojump_clock: trio.testing.MockClock, tmp_path, backings: Backings) -> None:
    """The review's reproduction: a client answers each batch after half the timeout,
    having taken one page and answered FAILED for the rest.  That used to count as
    progress, so the drain would last about a batch's worth of half-timeouts for every
    page; now the drain gives up on it one timeout after its start, plus the few
    pages' worth of credit (T/256 each) it earned."""
    timeout, npages = 1.0, 2048
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s"), npages, drain_timeout=timeout)
        store = server.store
        client, pager = await pager_on(nursery, address, "trickle", npages, backings)
        taken = 0

        async def one_page_then_failed(handback: HandBack) -> bytes:
            nonlocal taken
            await trio.sleep(timeout / 2)
            first = HandBack(handback.cause, handback.pages[:1], handback.seqs[:1], handback.data[:PAGE_SIZE])
            statuses = await pager.take_back(first)
            taken += statuses.count(TakeStatus.TAKEN)
            return statuses + bytes([TakeStatus.FAILED]) * (len(handback.pages) - 1)

        client.set_handlers(one_page_then_failed, pager.pages_lost)
        start = trio.current_time()
        report = await query(address, Drain(), timeout=FOREVER)
        elapsed = trio.current_time() - start
        assert 0 < taken < 16
        assert elapsed == pytest.approx(timeout + taken * timeout / BATCH, abs=0.05)
        assert report == {"handed_back": {"trickle": taken}, "dropped": {"trickle": npages - taken}}
        assert store.counters[HostCounter.DRAIN_GAVE_UP] == 1
        assert store.clients["trickle"].count == npages - taken and store.clients["trickle"].lent_count == 0
        assert pager.map.counts()["backing"] == taken
        nursery.cancel_scope.cancel()


async def test_coming_back_again_and_again_earns_one_timeout_only(
        autojump_clock: trio.testing.MockClock, tmp_path, backings: Backings) -> None:
    """Only a client's first return during a drain moves its deadline to a whole timeout
    from then: one that reconnects every half timeout and takes nothing would otherwise
    keep the drain (and the store's exit) waiting for as long as it went on.  Away at
    the start, back at 1.5 s of a 2 s timeout and again every half second: given up on
    at 3.5 s, while it is still coming and going (it would go on until 10 s)."""
    timeout, npages = 2.0, 300
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s"), npages, drain_timeout=timeout)
        store = server.store
        async with trio.open_nursery() as away:
            client, pager = await pager_on(away, address, "flapper", npages, backings)
            away.cancel_scope.cancel()
        with trio.fail_after(5):
            while store.connections_active:
                await trio.sleep(0.01)
        connects = 0

        async def take_nothing(handback: HandBack) -> bytes:
            return bytes([TakeStatus.FAILED]) * len(handback.pages)

        async def come_and_go() -> None:
            nonlocal connects
            await trio.sleep(1.5)
            client.set_handlers(take_nothing, pager.pages_lost)
            while trio.current_time() - start < 10:
                async with trio.open_nursery() as link:
                    await link.start(client.run)
                    await client.wait_connected()
                    connects += 1
                    await trio.sleep(timeout / 8)
                    link.cancel_scope.cancel()
                await trio.sleep(timeout / 8)

        start = trio.current_time()
        nursery.start_soon(come_and_go)
        report = await query(address, Drain(), timeout=FOREVER)
        elapsed = trio.current_time() - start
        assert connects >= 4  # it came back again and again before the drain gave up on it
        assert elapsed == pytest.approx(1.5 + timeout, abs=0.3)
        assert report == {"handed_back": {"flapper": 0}, "dropped": {"flapper": npages}}
        assert store.counters[HostCounter.DRAIN_GAVE_UP] == 1
        assert store.clients["flapper"].count == npages and store.clients["flapper"].lent_count == 0
        nursery.cancel_scope.cancel()
