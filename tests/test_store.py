"""The host's page store: admission, never-stale, versions, identity, memory, hand-back."""

from __future__ import annotations

import random
from array import array

import pytest

from pagewire import auth
from pagewire.access import IN_PROCESS
from hoststore.clientpages import ClientPages
from pagewire.messages import (PAGE_SIZE, PROTOCOL_VERSION, ROLE_OBSERVER, ROLE_PAGER, HandBackCause, Hello, PageStatus, TakeStatus)
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.slab import Slab, SlabFull
from hoststore.store import HostCounter, RequestError, Store, get_answer

S = PageStatus
NONCE = b"s" * 16


def page(n: int, version: int = 0) -> bytes:
    return (n.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE_SIZE // 8)


class Pressure:
    def __init__(self) -> None:
        self.percent = 10.0

    def __call__(self) -> Snapshot:
        return Snapshot.fake(self.percent)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(capacity: int = 8, quota: int | None = None, clock: Clock | None = None,
               **kw) -> tuple[Store, Pressure]:
    pressure = Pressure()
    limits = Limits(capacity_pages=capacity, quota_pages=quota, **kw)
    return Store(limits, Sampler(0, source=pressure), clock=clock or Clock()), pressure


def hello(name: str = "a", npages: int = 16, instance: str = "i1", nonce: bytes = b"c" * 16,
          proof: bytes | None = None) -> Hello:
    return Hello(PROTOCOL_VERSION, name, ROLE_PAGER, npages * PAGE_SIZE, instance, nonce, proof)


def attach(store: Store, name: str = "a", npages: int = 16, instance: str = "i1") -> ClientPages:
    client, answer, _ = store.attach(hello(name, npages, instance), NONCE, owner=IN_PROCESS)
    assert client is not None and not answer.resumed
    store.bind(client, object())
    return client


async def put(store: Store, c: ClientPages, first: int, seq: int, *pages: bytes) -> bytes:
    return await store.put(c, first, seq, b"".join(pages))


async def get(store: Store, c: ClientPages, *pages: int):
    return await get_answer(store, c, array("Q", pages))


async def test_put_get_roundtrip_with_versions_and_counters() -> None:
    store, _ = make_store()
    c = attach(store)
    assert await put(store, c, 3, 1, page(3), page(4)) == bytes([S.STORED, S.STORED])
    ans = await get(store, c, 4, 3, 5)
    assert list(ans.statuses) == [S.STORED, S.STORED, S.MISSING]
    assert list(ans.seqs) == [1, 1, 0]
    assert ans.data == page(4) + page(3) + bytes(PAGE_SIZE)
    st = store.stats(admin=True)
    assert (st["pages_stored"], st["accepted"], st["reads"], st["misses"]) == (2, 2, 2, 1)
    assert st["clients"]["a"]["pages"] == 2 and st["clients"]["a"]["accepted"] == 2
    c.check()


async def test_capacity_refuses_and_replacement_fits() -> None:
    store, _ = make_store(capacity=2)
    c = attach(store)
    assert list(await put(store, c, 0, 1, page(0), page(1), page(2))) == [S.STORED, S.STORED, S.REFUSED_CAPACITY]
    assert await put(store, c, 1, 2, page(1, 2)) == bytes([S.STORED])  # replaces: no new capacity
    assert (await get(store, c, 1)).data == page(1, 2) and list((await get(store, c, 1)).seqs) == [2]
    assert store.counters[HostCounter.REFUSED_CAPACITY] == 1 and store.counters[HostCounter.REPLACED] == 1


async def test_refused_new_version_drops_the_old_copy() -> None:
    store, pressure = make_store()
    c = attach(store)
    await put(store, c, 5, 1, page(5, 1))
    pressure.percent = 95
    assert await put(store, c, 5, 2, page(5, 2)) == bytes([S.REFUSED_PRESSURE])
    assert (await get(store, c, 5)).statuses == bytes([S.MISSING])  # never the stale version 1
    assert store.counters[HostCounter.STALE_DROPPED] == 1 and store.pages == 0
    c.check()


async def test_late_older_put_never_overwrites_a_newer_version() -> None:
    store, _ = make_store()
    c = attach(store)
    await put(store, c, 0, 7, page(0, 7))
    assert await put(store, c, 0, 6, page(0, 6)) == bytes([S.REFUSED_OUTDATED])
    assert (await get(store, c, 0)).data == page(0, 7)


async def test_invalidate_respects_newer_versions() -> None:
    store, _ = make_store()
    c = attach(store)
    await put(store, c, 0, 1, page(0), page(1))
    await put(store, c, 1, 3, page(1, 3))
    assert await store.invalidate(c, 0, 2, 2) == 1  # page 0 (seq 1) dropped, page 1 (seq 3) kept
    assert list((await get(store, c, 0, 1)).statuses) == [S.MISSING, S.STORED]
    assert (await get(store, c, 1)).data == page(1, 3)
    c.check()


async def test_quota_per_client() -> None:
    store, _ = make_store(capacity=8, quota=2)
    a, b = attach(store, "a"), attach(store, "b")
    assert list(await put(store, a, 0, 1, page(0), page(0), page(0))) == [S.STORED, S.STORED, S.REFUSED_QUOTA]
    assert list(await put(store, b, 0, 1, page(0), page(0))) == [S.STORED, S.STORED]


async def test_draining_refuses_and_drops_older_copies() -> None:
    store, _ = make_store()
    c = attach(store)
    await put(store, c, 0, 1, page(0))
    store.draining = True
    assert await put(store, c, 0, 2, page(0, 2), page(1, 2)) == bytes([S.REFUSED_DRAINING] * 2)
    assert store.pages == 0 and store.counters[HostCounter.REFUSED_DRAINING] == 2


async def test_reconnect_with_proof_keeps_pages_and_supersedes_the_old_connection() -> None:
    store, _ = make_store()
    c = attach(store)
    old_session = c.session
    await put(store, c, 0, 1, page(0), page(1), page(2))
    client_nonce = b"x" * 16
    proof = auth.reconnect_proof(c.secret, "a", NONCE, client_nonce)
    again, answer, superseded = store.attach(hello(nonce=client_nonce, proof=proof), NONCE, owner=IN_PROCESS)
    assert again is c and answer.resumed and superseded is old_session and store.pages == 3
    assert store.counters[HostCounter.TAKEOVERS] == 1


async def test_name_in_use_without_proof_is_refused_and_a_replay_does_not_work() -> None:
    store, _ = make_store()
    c = attach(store)
    await put(store, c, 0, 1, page(0))
    with pytest.raises(RequestError, match="in use"):
        store.attach(hello(instance="i2"), NONCE, owner=IN_PROCESS)
    # A hello with a proof made for another server nonce (a replay) proves nothing.
    stale = auth.reconnect_proof(c.secret, "a", b"o" * 16, b"c" * 16)
    with pytest.raises(RequestError, match="in use"):
        store.attach(hello(proof=stale), NONCE, owner=IN_PROCESS)



async def test_an_away_client_keeps_its_name_and_pages_for_the_away_timeout() -> None:
    clock = Clock()
    store, _ = make_store(clock=clock)
    c = attach(store)
    await put(store, c, 0, 1, page(0))
    store.detach(c, c.session)
    clock.now += 299
    with pytest.raises(RequestError, match="away with 1 pages"):
        store.attach(hello(instance="i2"), NONCE, owner=IN_PROCESS)
    # Its owner can always come back.
    proof = auth.reconnect_proof(c.secret, "a", NONCE, b"c" * 16)
    again, answer, _ = store.attach(hello(proof=proof), NONCE, owner=IN_PROCESS)
    assert again is c and answer.resumed
    store.bind(c, object())
    store.detach(c, c.session)
    clock.now += 301  # away too long: a new instance under its name replaces it, dropping its pages
    fresh, answer, _ = store.attach(hello(instance="i2"), NONCE, owner=IN_PROCESS)
    assert fresh is not c and not answer.resumed and store.pages == 0
    assert store.counters[HostCounter.DROPPED_SESSIONS] == 1


def test_a_client_without_pages_is_replaced_at_once() -> None:
    store, _ = make_store()
    c = attach(store)
    store.detach(c, c.session)
    fresh, _, _ = store.attach(hello(instance="i2"), NONCE, owner=IN_PROCESS)
    assert fresh is not c


# -- names belong to their identity -------------------------------------------------------

OWNER, OTHER = "uid 1000", "uid 1001"


def attach_as(store: Store, owner: str, name: str = "a", instance: str = "i1", nonce: bytes = b"c" * 16,
              proof: bytes | None = None) -> tuple[ClientPages | None, bool]:
    client, answer, _ = store.attach(hello(name, instance=instance, nonce=nonce, proof=proof), NONCE, owner=owner)
    return client, answer.resumed


async def test_another_identity_never_takes_a_name_whatever_it_holds_and_however_long_away() -> None:
    clock = Clock()
    store, _ = make_store(clock=clock)
    c, _ = attach_as(store, OWNER)
    store.bind(c, object())
    await put(store, c, 0, 1, page(0), page(1))
    with pytest.raises(RequestError, match="belongs to uid 1000, not to uid 1001"):
        attach_as(store, OTHER, instance="thief")  # connected: not "in use", but not yours
    store.detach(c, c.session)
    clock.now += 100 * store.away_timeout  # long gone: a new instance of the same uid could replace it now
    proof = auth.reconnect_proof(c.secret, "a", NONCE, b"c" * 16)
    for kw in ({"instance": "thief"}, {"proof": proof}):  # nor with the owner's proof, stolen
        with pytest.raises(RequestError, match="belongs to uid 1000"):
            attach_as(store, OTHER, **kw)
    assert store.counters[HostCounter.REFUSED_NAME_OWNER] == 3
    assert store.pages == 2 and store.counters[HostCounter.DROPPED_SESSIONS] == 0
    assert (await get(store, c, 0, 1)).data == page(0) + page(1)
    again, resumed = attach_as(store, OWNER, proof=proof)  # the owner's reconnect is never refused
    assert again is c and resumed


def test_another_identity_does_not_take_an_empty_name_either() -> None:
    """A name holding nothing is still its owner's: the owner's reconnect must find it."""
    store, _ = make_store()
    c, _ = attach_as(store, OWNER)
    store.detach(c, c.session)
    with pytest.raises(RequestError, match="belongs to"):
        attach_as(store, OTHER, instance="thief")
    proof = auth.reconnect_proof(c.secret, "a", NONCE, b"c" * 16)
    assert attach_as(store, OWNER, proof=proof) == (c, True)


async def test_the_same_identity_keeps_its_old_rules() -> None:
    """A new instance of the owner (a restarted vswapfs) replaces a client away with pages
    after the away timeout, and one away with none at once, as before."""
    clock = Clock()
    store, _ = make_store(clock=clock)
    c, _ = attach_as(store, OWNER)
    await put(store, c, 0, 1, page(0))
    store.detach(c, c.session)
    with pytest.raises(RequestError, match="away with 1 pages"):
        attach_as(store, OWNER, instance="i2")
    clock.now += store.away_timeout + 1
    fresh, resumed = attach_as(store, OWNER, instance="i2")
    assert fresh is not c and not resumed and store.pages == 0
    assert store.counters[HostCounter.DROPPED_SESSIONS] == 1


async def test_evict_drops_an_away_clients_pages_and_frees_its_name_but_never_a_connected_ones() -> None:
    clock = Clock()
    store, _ = make_store(clock=clock)
    c, _ = attach_as(store, OWNER)
    store.bind(c, object())
    await put(store, c, 0, 1, page(0), page(1), page(2))
    for force in (False, True):  # connected: not even --force
        with pytest.raises(RequestError, match="connected"):
            store.evict("a", force)
    assert store.pages == 3 and store.counters[HostCounter.EVICT_REQUESTS] == 0
    with pytest.raises(RequestError, match="no client named 'b'"):
        store.evict("b")
    store.detach(c, c.session)
    clock.now += store.away_timeout
    assert store.evict("a") == 3
    assert store.pages == 0 and "a" not in store.clients and "a" not in store.client_counters
    assert store.counters[HostCounter.EVICT_REQUESTS] == 1 and store.counters[HostCounter.EVICTED] == 3
    fresh, resumed = attach_as(store, OTHER, instance="new")  # the name is free, for anyone
    assert fresh is not None and not resumed and store.registry.owners["a"] == OTHER


async def test_evict_refuses_a_client_away_for_a_moment_unless_forced() -> None:
    """A client whose connection just dropped (a reconnect backoff) is on its way back:
    evicting it would SIGBUS its processes.  Refused until it has been away for
    --away-timeout, or with --force; how long it has been away is in its stats."""
    clock = Clock()
    store, _ = make_store(clock=clock)
    c, _ = attach_as(store, OWNER)
    store.bind(c, object())
    await put(store, c, 0, 1, page(0), page(1))
    assert store.client_stats(c)["away_seconds"] is None
    store.detach(c, c.session)
    clock.now += store.away_timeout - 1
    assert store.stats(admin=True)["clients"]["a"]["away_seconds"] == store.away_timeout - 1
    with pytest.raises(RequestError, match=r"away for 299s only, less than --away-timeout \(300s\).*--force"):
        store.evict("a")
    assert store.pages == 2 and store.counters[HostCounter.EVICT_REQUESTS] == 0
    proof = auth.reconnect_proof(c.secret, "a", NONCE, b"c" * 16)
    assert attach_as(store, OWNER, proof=proof) == (c, True)  # it did come back, with its pages
    assert (await get(store, c, 0, 1)).data == page(0) + page(1)
    store.detach(c, c.session)
    assert store.evict("a", force=True) == 2  # the admin insists
    assert store.pages == 0 and store.counters[HostCounter.EVICTED] == 2


def test_a_flood_of_names_pushes_out_the_flooders_own_empty_names_first() -> None:
    """At --max-clients, names away and holding nothing make room, the newcomer's own
    identity's: inventing names cannot push another owner's name out (and then take it)."""
    store, _ = make_store()
    store.registry.max_clients = 3
    owner, _ = attach_as(store, OWNER, name="victim")
    store.detach(owner, owner.session)  # away, holding nothing
    for i in range(20):  # each hello under a new name, then gone (never bound: away)
        attach_as(store, OTHER, name=f"junk{i}", instance=f"j{i}")
    assert "victim" in store.clients and store.registry.owners["victim"] == OWNER and len(store.clients) == 3
    with pytest.raises(RequestError, match="belongs to uid 1000"):
        attach_as(store, OTHER, name="victim", instance="thief")
    proof = auth.reconnect_proof(owner.secret, "victim", NONCE, b"c" * 16)
    assert attach_as(store, OWNER, name="victim", proof=proof) == (owner, True)


async def test_a_full_store_never_forgets_another_identitys_name_to_make_room() -> None:
    """The review's reproduction: another identity fills --max-clients with names that
    hold a page each, then says hello under one more.  The victim's name (away and
    empty after a clean stop) used to be forgotten for it, and then claimed, so that
    the owner's next start was refused.  Now the newcomer is refused instead, and
    the owner's restart gets its name."""
    store, _ = make_store(capacity=64)
    store.registry.max_clients = 4
    victim, _ = attach_as(store, OWNER, name="victim")
    store.detach(victim, victim.session)  # stopped cleanly: away, holding nothing
    for i in range(3):  # the other identity's names, each holding a page: never forgotten
        c, _ = attach_as(store, OTHER, name=f"junk{i}", instance=f"j{i}")
        await put(store, c, 0, 1, page(0))
        store.detach(c, c.session)
    with pytest.raises(RequestError, match="max-clients.*none of them yours to forget.*vswapctl evict"):
        attach_as(store, OTHER, name="y", instance="y")  # no empty name of its own to give up
    assert store.counters[HostCounter.REFUSED_CLIENTS] == 1
    assert set(store.clients) == {"victim", "junk0", "junk1", "junk2"} and store.registry.owners["victim"] == OWNER
    with pytest.raises(RequestError, match="belongs to uid 1000"):
        attach_as(store, OTHER, name="victim", instance="thief")
    restarted, resumed = attach_as(store, OWNER, name="victim", instance="restarted")  # the owner's next start
    assert restarted is not None and restarted is not victim and not resumed
    assert store.registry.owners["victim"] == OWNER and store.pages == 3


async def test_device_size_above_the_cap_is_refused_and_memory_follows_pages() -> None:
    store, _ = make_store(max_device_size=1 << 40)
    with pytest.raises(RequestError, match="max-device-size"):
        store.attach(hello(npages=(1 << 40) // PAGE_SIZE + 1), NONCE, owner=IN_PROCESS)
    # A client claiming a huge device costs nothing until it stores pages.
    big = attach(store, "big", npages=(1 << 40) // PAGE_SIZE)
    assert big.index.nbytes == 0 and big.slab.mapped_bytes == 0
    await put(store, big, (1 << 27) + 5, 1, page(1))
    assert big.index.nbytes == 1024 and big.slab.mapped_bytes == big.slab.chunk_pages * PAGE_SIZE


def test_observer_hello_takes_no_name() -> None:
    store, _ = make_store()
    client, answer, _ = store.attach(Hello(PROTOCOL_VERSION, "a", ROLE_OBSERVER, 0, "x", NONCE), NONCE,
                                     owner=IN_PROCESS)
    assert client is None and answer.admin and "a" not in store.clients


async def test_failing_allocation_is_a_refusal_not_a_crash(monkeypatch) -> None:
    store, _ = make_store(capacity=100)
    c = attach(store)
    c.slab.chunk_pages = 2

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    await put(store, c, 0, 1, page(0), page(1))
    monkeypatch.setattr("hoststore.slab.mmap.mmap", no_memory)
    out = await put(store, c, 2, 1, page(2), page(3))
    assert list(out) == [S.REFUSED_NOMEM, S.REFUSED_NOMEM]
    assert store.counters[HostCounter.REFUSED_NOMEM] == 2 and store.pages == 2
    c.check()


async def test_slab_gives_memory_back_as_pages_leave() -> None:
    store, _ = make_store(capacity=10_000)
    c = attach(store, npages=10_000)
    c.slab.chunk_pages = 64
    for first in range(0, 1024, 256):
        await put(store, c, first, 1, *(page(first + i) for i in range(256)))
    assert c.slab.mapped_bytes >= 1024 * PAGE_SIZE
    # Drop every other page, then read all back: pages moved to fill holes stay correct.
    for p in range(0, 1024, 2):
        await store.invalidate(c, p, 1, 1)
    c.check()
    odd = range(1, 1024, 2)
    data = b"".join([(await get(store, c, *odd[i : i + 256])).data for i in range(0, len(odd), 256)])
    assert data == b"".join(page(p) for p in odd)
    assert c.slab.mapped_bytes <= (512 + 2 * 64) * PAGE_SIZE
    await store.invalidate(c, 0, 1024, 1)
    assert c.count == 0 and c.slab.mapped_bytes <= 64 * PAGE_SIZE and c.index.nbytes == 0


def test_slab_full_is_reported() -> None:
    slab = Slab(chunk_pages=1)
    slab.grow()
    import mmap as mmap_module

    real = mmap_module.mmap
    try:
        mmap_module.mmap = lambda *a, **k: (_ for _ in ()).throw(MemoryError())  # type: ignore[misc]
        with pytest.raises(SlabFull):
            slab.grow()
    finally:
        mmap_module.mmap = real  # type: ignore[misc]


async def test_hand_back_lends_oldest_first_and_frees_only_on_answer() -> None:
    store, _ = make_store(capacity=16)
    c = attach(store)
    for p in range(6):
        await put(store, c, p, p + 1, page(p))
    await get(store, c, 0)  # page 0 is now the most recently used
    hb = await store.lend(c, HandBackCause.PRESSURE, 3)
    assert list(hb.pages) == [1, 2, 3] and list(hb.seqs) == [2, 3, 4]
    assert hb.data == page(1) + page(2) + page(3)
    assert store.pages == 6 and c.lent_count == 3  # nothing freed before the answer
    assert (await get(store, c, 2)).data == page(2)  # still readable while lent
    nxt = await store.lend(c, HandBackCause.PRESSURE, 10)
    assert 1 not in nxt.pages  # lent pages are not lent twice
    store.unlend(c, nxt)
    await put(store, c, 3, 99, page(3, 99))  # rewritten while lent: that version stays
    freed = store.settle(c, hb, bytes([TakeStatus.TAKEN, TakeStatus.FAILED, TakeStatus.TAKEN]))
    assert freed == 1 and store.pages == 5
    assert list((await get(store, c, 1, 2, 3)).statuses) == [S.MISSING, S.STORED, S.STORED]
    assert (await get(store, c, 3)).data == page(3, 99)
    assert store.counters[HostCounter.HANDED_BACK_PRESSURE] == 1
    assert store.counters[HostCounter.HANDBACK_FAILED] == 1 and c.lent_count == 0
    c.check()


async def test_handback_order_puts_clients_over_quota_first() -> None:
    store, _ = make_store(capacity=100, quota=3)
    a, b = attach(store, "a"), attach(store, "b")
    await put(store, a, 0, 1, page(0), page(1))
    await put(store, b, 0, 2, page(0), page(1), page(2))
    store.limits = Limits(capacity_pages=100, quota_pages=2)
    assert [c.name for c in store.handback_order()] == ["b", "a"]
    store.limits = Limits(capacity_pages=100)
    assert [c.name for c in store.handback_order()] == ["a", "b"]  # a's oldest page is older


async def test_random_operations_keep_the_store_consistent() -> None:
    """Whatever mix of puts, replacements, invalidations and hand-backs, the
    index, the slab and the LRU list agree, and every page reads back as last stored."""
    rng = random.Random(7)
    store, pressure = make_store(capacity=200)
    c = attach(store, npages=256)
    c.slab.chunk_pages = 16
    truth: dict[int, int] = {}
    lent = []
    for seq in range(1, 3000):
        op = rng.random()
        pressure.percent = 95 if rng.random() < 0.05 else 10
        if op < 0.5:
            first = rng.randrange(250)
            n = rng.randint(1, 6)
            out = await put(store, c, first, seq, *(page(first + i, seq) for i in range(n)))
            for i, status in enumerate(out):
                if status == S.STORED:
                    truth[first + i] = seq
                elif status != S.REFUSED_OUTDATED:
                    truth.pop(first + i, None)
        elif op < 0.7:
            first = rng.randrange(250)
            n = rng.randint(1, 30)
            await store.invalidate(c, first, min(n, 256 - first), seq)
            for p in range(first, min(first + n, 256)):
                truth.pop(p, None)
        elif op < 0.85:
            hb = await store.lend(c, HandBackCause.PRESSURE, rng.randint(1, 10))
            if hb is not None:
                lent.append(hb)
        elif lent:
            hb = lent.pop(rng.randrange(len(lent)))
            statuses = bytes(rng.choice(list(TakeStatus)) for _ in hb.pages)
            store.settle(c, hb, statuses)
            for p, s, st in zip(hb.pages, hb.seqs, statuses):
                if st != TakeStatus.FAILED and truth.get(p) == s:
                    del truth[p]
        c.check()
        assert store.pages == c.count == len(truth)
    ans = await get(store, c, *range(256))
    for p in range(256):
        if p in truth:
            assert ans.statuses[p] == S.STORED and ans.seqs[p] == truth[p]
            assert ans.data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == page(p, truth[p])
        else:
            assert ans.statuses[p] == S.MISSING


@pytest.mark.parametrize("first,count", [(15, 2), (16, 1)])
async def test_out_of_range_requests_are_errors(first: int, count: int) -> None:
    store, _ = make_store()
    c = attach(store)
    with pytest.raises(RequestError):
        await put(store, c, first, 1, *(page(0) for _ in range(count)))
    with pytest.raises(RequestError):
        await get(store, c, first + count - 1)
    with pytest.raises(RequestError):
        await store.invalidate(c, first, count, 1)
