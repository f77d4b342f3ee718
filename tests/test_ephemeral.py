"""Ephemeral pools: pages the store drops, asking no one, and never a swap page.

On the store alone (admission, capacity, quota, compression, the pressure loop on
trio's fake clock) and over a real socket (a drain, shared memory, the hello, the
counters).
"""

from __future__ import annotations

from array import array

import pytest
import trio

from hoststore import ephemeral
from hoststore.clientpages import ClientPages
from hoststore.handback import HandBackEngine, Pace
from hoststore.policies import parse_policy
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.server import Server
from hoststore.store import HostCounter, RequestError, Store, get_answer
from pagewire import auth
from pagewire.access import IN_PROCESS
from pagewire.address import Address
from pagewire.causes import DropCause
from pagewire.messages import (PAGE_SIZE, POOL_EPHEMERAL, POOL_SWAP, PROTOCOL_VERSION, ROLE_PAGER, Drain, HandBack,
                               HandBackCause, Hello, MessageError, PageStatus, Stats, TakeStatus)
from vswapfs.hostclient import HostClient, query

from .test_rpc import start_server

S = PageStatus
NONCE = b"s" * 16


def page(n: int, version: int = 1) -> bytes:
    """Not same-filled, different for every page and version."""
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little") + b"ephemera") * (PAGE_SIZE // 16)


def make_store(capacity: int = 20, quota: int | None = None, level: list[float] | None = None, **kw) -> Store:
    level = level if level is not None else [10.0]
    return Store(Limits(capacity_pages=capacity, quota_pages=quota), Sampler(0, source=lambda: Snapshot.fake(level[0])),
                 **kw)


def hello(name: str, pool: str, instance: str = "i1", nonce: bytes = b"c" * 16, proof: bytes | None = None,
          npages: int = 8192) -> Hello:
    return Hello(PROTOCOL_VERSION, name, ROLE_PAGER, npages * PAGE_SIZE, instance, nonce, proof, pool=pool)


def attach(store: Store, name: str, pool: str) -> ClientPages:
    client, _, _ = store.attach(hello(name, pool), NONCE, owner=IN_PROCESS)
    assert client is not None
    store.bind(client, object())
    return client


async def put_each(store: Store, client: ClientPages, pages: range) -> list[int]:
    """One put per page, in order: each later one is more recently used."""
    return [(await store.put(client, n, 1, page(n)))[0] for n in pages]


async def held(store: Store, client: ClientPages, pages: range) -> list[int]:
    """Which of ``pages`` the store holds, each checked to be exactly what was put."""
    answer = await get_answer(store, client, array("Q", pages))
    out = []
    for i, n in enumerate(pages):
        if answer.statuses[i] == S.STORED:
            assert answer.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == page(n)
            out.append(n)
    return out


# -- the message ------------------------------------------------------------------------------


def test_a_hello_names_its_pool_and_an_old_one_means_swap() -> None:
    h = hello("c", POOL_EPHEMERAL)
    assert Hello.from_wire(h.to_wire()).pool == POOL_EPHEMERAL
    wire = h.to_wire()
    del wire["pool"]
    assert Hello.from_wire(wire).pool == POOL_SWAP
    with pytest.raises(MessageError, match="unknown pool 'scratch'"):
        hello("c", "scratch")


# -- the store alone --------------------------------------------------------------------------


async def test_at_the_capacity_the_least_recently_used_ephemeral_pages_make_way() -> None:
    store = make_store(capacity=20)  # shares start to refuse at 18 pages: room is made below that
    cache, swap = attach(store, "cache", POOL_EPHEMERAL), attach(store, "swap", POOL_SWAP)
    assert await put_each(store, cache, range(18)) == [S.STORED] * 18
    assert await held(store, cache, range(1)) == [0]  # a read: page 0 is now the most recently used
    assert list(await store.put(swap, 0, 1, b"".join(page(n) for n in range(5)))) == [S.STORED] * 5
    assert await held(store, cache, range(18)) == [0, *range(6, 18)]  # 1..5 went, the oldest
    assert await held(store, swap, range(5)) == list(range(5))
    assert store.client_counters["cache"][HostCounter.DROPPED_CAPACITY] == 5
    assert store.counters[HostCounter.DROPPED_CAPACITY] == 5
    assert store.stats(admin=True)["ephemeral_pages"] == 13
    assert store.stats(admin=True)["clients"]["cache"]["pool"] == POOL_EPHEMERAL


async def test_swap_pages_are_never_dropped_to_make_way() -> None:
    store = make_store(capacity=10)
    swap = attach(store, "swap", POOL_SWAP)
    assert await put_each(store, swap, range(10)) == [S.STORED] * 10
    cache = attach(store, "cache", POOL_EPHEMERAL)
    assert await put_each(store, cache, range(2)) == [S.REFUSED_CAPACITY] * 2
    assert await held(store, swap, range(10)) == list(range(10))
    with pytest.raises(ValueError, match="never dropped"):
        ephemeral.drop_oldest(store, swap, 1, DropCause.PRESSURE)
    assert ephemeral.drop_lru(store, 100, DropCause.PRESSURE) == 0 and store.pages == 10


async def test_at_its_quota_an_ephemeral_client_keeps_its_newest_pages() -> None:
    store = make_store(capacity=100, quota=4)
    cache, swap = attach(store, "cache", POOL_EPHEMERAL), attach(store, "swap", POOL_SWAP)
    assert await put_each(store, cache, range(6)) == [S.STORED] * 6
    assert await held(store, cache, range(6)) == [2, 3, 4, 5]
    assert store.client_counters["cache"][HostCounter.DROPPED_QUOTA] == 2
    # a swap client at its quota is refused, as ever: nothing of its own goes
    assert await put_each(store, swap, range(6)) == [S.STORED] * 4 + [S.REFUSED_QUOTA] * 2


async def test_under_pressure_ephemeral_puts_are_refused_and_nothing_is_dropped_for_them() -> None:
    level = [10.0]
    store = make_store(capacity=4, level=level)
    cache = attach(store, "cache", POOL_EPHEMERAL)
    await put_each(store, cache, range(3))
    level[0] = 95.0
    assert await put_each(store, cache, range(3, 5)) == [S.REFUSED_PRESSURE] * 2
    assert store.pages == 3  # the pressure loop drops them, not a put


async def test_a_hand_back_of_an_ephemeral_pool_is_a_drop_and_asks_no_one() -> None:
    store = make_store(capacity=100)
    cache = attach(store, "cache", POOL_EPHEMERAL)
    await put_each(store, cache, range(10))

    async def ask(client: ClientPages, handback: HandBack) -> bytes:
        raise AssertionError("an ephemeral pool was asked to take pages back")

    engine = HandBackEngine(store, ask)
    assert await engine.hand_back(cache, HandBackCause.PRESSURE, 3) == 3
    assert await engine.hand_back(cache, HandBackCause.REPLICATION, 3) == 0  # clean: left where they are
    assert await engine.hand_back(cache, HandBackCause.DRAIN, 100) == 7
    assert store.pages == 0
    counters = store.client_counters["cache"]
    assert counters[HostCounter.DROPPED_PRESSURE] == 3 and counters[HostCounter.DROPPED_DRAIN] == 7
    assert counters[HostCounter.HANDED_BACK_PRESSURE] == 0


async def test_under_pressure_every_ephemeral_page_goes_before_a_swap_page_is_asked_for(autojump_clock) -> None:
    level = [10.0]
    store = make_store(capacity=10000, level=level)
    cache, other, swap = (attach(store, n, p) for n, p in (("cache", POOL_EPHEMERAL), ("other", POOL_EPHEMERAL),
                                                             ("swap", POOL_SWAP)))
    for client, n in ((cache, 3000), (other, 2000), (swap, 100)):
        assert list(await store.put(client, 0, 1, bytes(range(256)) * (16 * n))) == [S.STORED] * n  # not same-filled
    asked: list[tuple[str, int]] = []
    swap_asked = trio.Event()

    async def ask(client: ClientPages, handback: HandBack) -> bytes:
        asked.append((client.name, ephemeral.pages(store)))
        swap_asked.set()
        return bytes([TakeStatus.TAKEN]) * len(handback.pages)

    engine = HandBackEngine(store, ask, pace=Pace(drop_per_round=4096, drop_chunk=1000))
    level[0] = 95.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.under_pressure)
        with trio.fail_after(60):  # on the fake clock: some twenty rounds
            await swap_asked.wait()
        nursery.cancel_scope.cancel()
    assert asked[0] == ("swap", 0)  # the first swap client asked: once no ephemeral page was left
    counters = store.client_counters
    assert counters["cache"][HostCounter.DROPPED_PRESSURE] == 3000
    assert counters["other"][HostCounter.DROPPED_PRESSURE] == 2000
    assert store.counters[HostCounter.DROPPED_PRESSURE] == 5000


async def test_ephemeral_puts_that_keep_coming_under_pressure_do_not_starve_the_hand_back(autojump_clock) -> None:
    """With a policy that admits under pressure, an ephemeral client's pages come in as
    fast as they are dropped: swap pages are still handed back, every round."""
    level = [95.0]
    store = make_store(capacity=1000, level=level, policy=parse_policy("accept-all"))
    swap, cache = attach(store, "swap", POOL_SWAP), attach(store, "cache", POOL_EPHEMERAL)
    await store.put(swap, 0, 1, b"".join(page(n) for n in range(8)))
    swap_asked = trio.Event()

    async def ask(client: ClientPages, handback: HandBack) -> bytes:
        assert client is swap
        swap_asked.set()
        return bytes([TakeStatus.TAKEN]) * len(handback.pages)

    async def keep_putting() -> None:
        for n in range(1000):
            assert list(await store.put(cache, n % 64, n + 1, page(n))) == [S.STORED]
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_putting)
        nursery.start_soon(HandBackEngine(store, ask).under_pressure)
        with trio.fail_after(5):
            await swap_asked.wait()
        nursery.cancel_scope.cancel()
    assert store.client_counters["cache"][HostCounter.DROPPED_PRESSURE] > 0


async def test_lru_order_holds_across_two_ephemeral_pools() -> None:
    store = make_store(capacity=20)  # room for 18
    a, b = attach(store, "a", POOL_EPHEMERAL), attach(store, "b", POOL_EPHEMERAL)
    for n in range(9):  # a0 b0 a1 b1 ... each put more recent than the last
        await put_each(store, a, range(n, n + 1))
        await put_each(store, b, range(n, n + 1))
    swap = attach(store, "swap", POOL_SWAP)
    await store.put(swap, 0, 1, b"".join(page(n) for n in range(3)))
    assert await held(store, a, range(9)) == list(range(2, 9))  # a0 b0 a1 went: the three oldest
    assert await held(store, b, range(9)) == list(range(1, 9))


async def test_a_swap_put_its_quota_refuses_drops_nothing_and_a_stored_page_needs_no_room() -> None:
    store = make_store(capacity=20, quota=3)
    swap = attach(store, "swap", POOL_SWAP)
    assert await put_each(store, swap, range(3)) == [S.STORED] * 3
    cache = attach(store, "cache", POOL_EPHEMERAL)
    store.limits = Limits(capacity_pages=20, quota_pages=3, quotas={"cache": 15})  # type: ignore[misc]
    assert await put_each(store, cache, range(15)) == [S.STORED] * 15  # 18 held: at the room
    assert await put_each(store, swap, range(3, 5)) == [S.REFUSED_QUOTA] * 2
    assert list(await store.put(swap, 0, 2, b"".join(page(n, 2) for n in range(3)))) == [S.STORED] * 3
    assert store.counters[HostCounter.DROPPED_CAPACITY] == 0 and store.pages == 18


async def test_compressed_an_ephemeral_client_at_its_quota_keeps_its_newest_pages() -> None:
    """Dropping frees what the pages cost, in size classes: a client of compressed pages at
    its quota drops as many as its new page needs, and is not refused."""
    from pagewire.codec import Codec

    store = make_store(capacity=1000, quota=4, compress=Codec.ZSTD)
    cache = attach(store, "cache", POOL_EPHEMERAL)
    text = [(b"record %06d: the quick brown fox " % n) * 120 for n in range(60)]
    for n in range(60):
        assert list(await store.put(cache, n, 1, text[n][:PAGE_SIZE])) == [S.STORED]
        await store.compressor.settle()
    assert cache.charged_pages <= 4 and cache.count > 4  # more pages than whole ones fit
    answer = await get_answer(store, cache, array("Q", range(60)))
    kept = [n for n in range(60) if answer.statuses[n] == S.STORED]
    assert kept == list(range(60 - len(kept), 60))  # the newest
    for n in kept:
        assert answer.data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] == text[n][:PAGE_SIZE]
    assert store.client_counters["cache"][HostCounter.DROPPED_QUOTA] == 60 - len(kept)
    assert store.client_counters["cache"][HostCounter.REFUSED_QUOTA] == 0


async def test_an_instance_cannot_come_back_as_another_pool() -> None:
    store = make_store()
    cache = attach(store, "cache", POOL_EPHEMERAL)
    await put_each(store, cache, range(2))
    proof = auth.reconnect_proof(cache.secret, "cache", NONCE, b"c" * 16)
    with pytest.raises(RequestError, match="cannot come back as a swap one"):
        store.attach(hello("cache", POOL_SWAP, proof=proof), NONCE, owner=IN_PROCESS)
    again, answer, _ = store.attach(hello("cache", POOL_EPHEMERAL, proof=proof), NONCE, owner=IN_PROCESS)
    assert again is cache and answer.resumed and store.pages == 2


# -- over a socket ------------------------------------------------------------------------------


async def start(nursery: trio.Nursery, path: str, store: Store, **config) -> tuple[Address, Server]:
    """A store's server with no pressure loop to speak of (as test_rpc's, every 60 s)."""
    return await start_server(nursery, path, store, handback_interval=60.0, **config)


async def test_a_dropped_page_is_a_miss_in_shared_memory_and_over_the_wire(tmp_path) -> None:
    store = make_store(capacity=64)
    async with trio.open_nursery() as nursery:
        address, _ = await start(nursery, str(tmp_path / "s"), store)
        client = HostClient(address, "cache", 64 * PAGE_SIZE, pool=POOL_EPHEMERAL)
        await nursery.start(client.run)
        assert await client.put(0, 1, page(0) + page(1)) == bytes(2)
        out = memoryview(bytearray(PAGE_SIZE))
        assert client.read_shared(0, 1, out) and bytes(out) == page(0)
        assert ephemeral.drop_lru(store, 1, DropCause.PRESSURE) == 1  # page 0, the older
        assert not client.read_shared(0, 1, out)
        answer = await client.get(array("Q", [0, 1]))
        assert list(answer.statuses) == [S.MISSING, S.STORED] and answer.data[PAGE_SIZE:] == page(1)
        stats = await query(address, Stats())
        assert stats["clients"]["cache"]["pool"] == POOL_EPHEMERAL and stats["ephemeral_pages"] == 1
        assert stats["dropped_pressure"] == 1
        nursery.cancel_scope.cancel()


async def test_an_ephemeral_client_will_not_run_on_a_store_that_keeps_it_as_swap(tmp_path, monkeypatch) -> None:
    """A store older than pools answers no pool, which means swap: the client hangs up
    rather than have its pages kept, and handed back, as swap pages."""
    from pagewire.messages import HelloAnswer

    answer_to_wire = HelloAnswer.to_wire

    def without_pool(answer: HelloAnswer) -> dict:
        wire = answer_to_wire(answer)
        del wire["pool"]  # as a store older than pools answers
        return wire

    monkeypatch.setattr(HelloAnswer, "to_wire", without_pool)
    store = make_store(capacity=64)
    async with trio.open_nursery() as nursery:
        address, _ = await start(nursery, str(tmp_path / "s"), store)
        client = HostClient(address, "cache", 64 * PAGE_SIZE, pool=POOL_EPHEMERAL, backoff_min=60.0)
        await nursery.start(client.run)
        assert not client.connected
        swap = HostClient(address, "swap", 64 * PAGE_SIZE, pool=POOL_SWAP)
        await nursery.start(swap.run)
        assert swap.connected
        nursery.cancel_scope.cancel()


async def test_a_drain_drops_ephemeral_pages_and_hands_swap_pages_back(tmp_path) -> None:
    store = make_store(capacity=64)
    taken: dict[str, int] = {"cache": 0, "swap": 0}
    async with trio.open_nursery() as nursery:
        address, _ = await start(nursery, str(tmp_path / "s"), store)
        clients = {}
        for name, pool in (("cache", POOL_EPHEMERAL), ("swap", POOL_SWAP)):
            client = HostClient(address, name, 64 * PAGE_SIZE, pool=pool)

            async def take(handback: HandBack, name: str = name) -> bytes:
                taken[name] += len(handback.pages)
                return bytes([TakeStatus.TAKEN]) * len(handback.pages)

            client.set_handlers(take, lambda: None)
            await nursery.start(client.run)
            assert await client.put(0, 1, b"".join(page(n) for n in range(8))) == bytes(8)
            clients[name] = client
        report = await query(address, Drain(), wait=60.0)
        assert report["handed_back"] == {"swap": 8} and report["dropped"] == {}
        assert taken == {"cache": 0, "swap": 8}
        assert store.client_counters["cache"][HostCounter.DROPPED_DRAIN] == 8 and store.pages == 0
        nursery.cancel_scope.cancel()


async def test_a_drain_does_not_wait_for_an_away_ephemeral_pool(tmp_path) -> None:
    store = make_store(capacity=64)
    async with trio.open_nursery() as nursery:
        address, _ = await start(nursery, str(tmp_path / "s"), store, drain_timeout=5.0)
        client = HostClient(address, "cache", 64 * PAGE_SIZE, pool=POOL_EPHEMERAL)
        with trio.CancelScope() as running:
            async with trio.open_nursery() as own:
                await own.start(client.run)
                assert await client.put(0, 1, b"".join(page(n) for n in range(8))) == bytes(8)
                running.cancel()
        with trio.fail_after(10):
            while store.clients["cache"].connected:  # until the store has seen it go
                await trio.sleep(0.01)
        report = await query(address, Drain(), wait=60.0)  # not waiting out the away client's deadline:
        assert report["dropped"] == {} and store.pages == 0  # its pages were dropped at once
        assert store.client_counters["cache"][HostCounter.DROPPED_DRAIN] == 8
        nursery.cancel_scope.cancel()
