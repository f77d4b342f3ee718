"""A store that keeps pages compressed, under the pager's page rules: every path gives
back the page (reads from memory, get, hand-back, drain), capacity counts memory, and a
page that does not decode is EIO, never data."""

from __future__ import annotations

import os
import random
import threading
from array import array

import pytest
import trio

from hoststore.compressor import Idle
from hoststore.hostcounters import HostCounter
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.server import Server, ServerConfig, open_listener
from hoststore.store import Store
from pagewire.address import Address
from hoststore.sizeclasses import SPARE_CHUNKS
from pagewire.codec import CHUNK_BYTES, CLASS_SIZES, Codec
from pagewire.messages import PAGE_SIZE, Drain, HandBackCause
from vswapctl.workload import json_pool
from vswapfs.backing import Backing
from vswapfs.hostclient import HostClient
from vswapfs.inproc import InprocStore
from vswapfs.pagemap import BACKING, LOST
from vswapfs.pagercore import PageUnavailable
from vswapfs.pager import Pager

from .test_inproc import Pressure, until

NPAGES = 256
POOL = json_pool(7, NPAGES * PAGE_SIZE * 2)


def jpage(n: int, version: int) -> bytes:
    """Application-like data (JSON records, about 2.5:1), a different page per version."""
    at = ((n * 7 + version * 13) % NPAGES) * PAGE_SIZE
    return n.to_bytes(4, "little") + version.to_bytes(4, "little") + POOL[at + 8 : at + PAGE_SIZE]


def noise(n: int, version: int) -> bytes:
    return random.Random(n * 1000 + version).randbytes(PAGE_SIZE)


@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), NPAGES * PAGE_SIZE)
    yield b
    b.close()


def make(backing: Backing, capacity: int = NPAGES, pressure: Pressure | None = None,
         codec: Codec = Codec.ZSTD) -> tuple[Pager, InprocStore]:
    sampler = Sampler(interval=0.0, source=pressure or Pressure())
    store = InprocStore("test", backing.size, Limits(capacity_pages=capacity), sampler, handback_interval=0.01,
                        compress=codec)
    return Pager(backing, store), store


def damage(store: InprocStore, n: int) -> None:
    """Scribble over page ``n``'s compressed bytes in the store's memory."""
    z = store.client.zslab
    blob = z.encoded_view(store.client.index.get(n))
    blob[:] = bytes(len(blob))


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])
async def test_pages_round_trip_compressed(backing: Backing, codec: Codec) -> None:
    pager, store = make(backing, codec=codec)
    n = NPAGES - 8
    data = [jpage(i, 1) for i in range(n)] + [noise(i, 1) for i in range(n, NPAGES)]
    await pager.write(0, b"".join(data))
    assert store.stats()["compression"]["pending_pages"] == NPAGES  # the put did not wait for compression
    assert await pager.read(0, NPAGES * PAGE_SIZE) == b"".join(data)  # nor do reads
    assert await store.store.compressor.settle() == NPAGES
    assert await pager.read(0, NPAGES * PAGE_SIZE) == b"".join(data)
    comp = store.stats()["compression"]
    assert comp["algorithm"] == codec.name.lower() and comp["orig_data_bytes"] == NPAGES * PAGE_SIZE
    assert comp["incompressible_pages"] == 8 and comp["pending_pages"] == 0
    # What the size classes hold: their objects, their chunks' written tails, and a few spare chunks.
    assert comp["compr_data_bytes"] < comp["charged_bytes"] <= comp["mem_used_bytes"]
    assert comp["mem_used_bytes"] <= comp["charged_bytes"] + (len(CLASS_SIZES) + SPARE_CHUNKS) * CHUNK_BYTES
    assert comp["compress_seconds"] > 0
    assert pager.stats()["shared_reads"] == 2 * NPAGES and pager.stats()["checksum_errors"] == 0
    got = await store.get(array("Q", range(64)))  # over the "wire" too
    assert bytes(got.data) == b"".join(data[:64]) and list(got.seqs) == [pager.map.seqs[i] for i in range(64)]


async def test_capacity_counts_the_memory_pages_take(backing: Backing) -> None:
    """16 pages of capacity hold many more compressible pages, and exactly 16 that do not shrink."""
    pager, store = make(backing, capacity=16)
    for first in range(0, 64, 4):  # as they come, pages cost a page each until compressed
        await pager.write(first * PAGE_SIZE, b"".join(jpage(i, 1) for i in range(first, first + 4)))
        await store.store.compressor.settle()
    stats = store.stats()
    assert stats["accepted"] > 32
    assert stats["compression"]["charged_bytes"] <= 16 * PAGE_SIZE
    assert stats["accepted"] + stats["refused_capacity"] == 64
    assert await pager.read(0, 64 * PAGE_SIZE) == b"".join(jpage(i, 1) for i in range(64))
    await pager.write(64 * PAGE_SIZE, b"".join(noise(i, 1) for i in range(64, 128)))
    assert store.stats()["accepted"] == stats["accepted"]  # full: not one more page
    await pager.discard(0, 64 * PAGE_SIZE)
    assert store.stats()["compression"]["charged_bytes"] == 0
    await pager.write(64 * PAGE_SIZE, b"".join(noise(i, 2) for i in range(64, 128)))
    await store.store.compressor.settle()
    assert store.stats()["accepted"] == stats["accepted"] + 16  # at 4 KiB each
    assert await pager.read(64 * PAGE_SIZE, 64 * PAGE_SIZE) == b"".join(noise(i, 2) for i in range(64, 128))


async def test_rewrites_and_discards_keep_the_accounting_exact(backing: Backing) -> None:
    pager, store = make(backing)
    rng = random.Random(2)
    truth: dict[int, bytes] = {}
    for step in range(300):
        n = rng.randrange(NPAGES)
        if rng.random() < 0.8:
            truth[n] = jpage(n, step) if rng.random() < 0.8 else noise(n, step)
            await pager.write(n * PAGE_SIZE, truth[n])
        else:
            await pager.discard(n * PAGE_SIZE, PAGE_SIZE)
            truth.pop(n, None)
        if step % 7 == 0:
            await store.store.compressor.settle()
    store.client.zslab.check()
    store.client.check()
    comp = store.stats()["compression"]
    assert comp["orig_data_bytes"] == len(truth) * PAGE_SIZE
    for n, want in truth.items():
        assert await pager.read(n * PAGE_SIZE, PAGE_SIZE) == want


async def test_pressure_hands_compressed_pages_back_as_pages(backing: Backing) -> None:
    pressure = Pressure()
    pager, store = make(backing, pressure=pressure)
    data = [jpage(i, 1) for i in range(48)]
    await pager.write(0, b"".join(data))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await until(lambda: not store.stats()["compression"]["pending_pages"])  # the running store compresses
        assert store.stats()["compression"]["compr_data_bytes"] < 48 * PAGE_SIZE // 2
        pressure.used = 95.0
        await until(lambda: not store.stats()["pages_stored"])
        nursery.cancel_scope.cancel()
    assert store.stats()["handed_back_pressure"] == 48 and pager.map.counts()["backing"] == 48
    assert store.stats()["compression"]["mem_used_bytes"] <= 4 * 64 * 1024  # the spare chunks at most
    assert await pager.read(0, 48 * PAGE_SIZE) == b"".join(data)


async def test_a_page_that_does_not_decode_is_eio_and_a_checksum_error(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, jpage(0, 1) + jpage(1, 1))
    await store.store.compressor.settle()
    damage(store, 1)
    assert await pager.read(0, PAGE_SIZE) == jpage(0, 1)
    with pytest.raises(PageUnavailable):
        await pager.read(PAGE_SIZE, PAGE_SIZE)
    assert pager.stats()["checksum_errors"] == 1 and store.stats()["decode_errors"] == 1
    assert pager.stats()["shared_reads"] == 1  # the damaged copy never passed for the page


async def test_a_page_that_does_not_decode_is_not_handed_back_but_dropped(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(8)))
    await store.store.compressor.settle()
    damage(store, 3)
    freed = await store.hand_back(HandBackCause.PRESSURE, 8)
    assert freed == 7 and store.stats()["decode_errors"] == 1 and store.stats()["pages_stored"] == 0
    assert pager.map.get(3) != BACKING
    for n in (0, 1, 2, 4, 5, 6, 7):
        assert await pager.read(n * PAGE_SIZE, PAGE_SIZE) == jpage(n, 1)
    with pytest.raises(PageUnavailable):
        await pager.read(3 * PAGE_SIZE, PAGE_SIZE)
    assert pager.map.get(3) == LOST


async def test_a_store_daemon_shares_compressed_pages_and_drains_them(tmp_path, disk_dir: str) -> None:
    """Over a unix socket: reads from shared memory decode, a get decodes, a drain hands
    every page back as it was written."""
    store = Store(Limits(capacity_pages=NPAGES), Sampler(0, source=lambda: Snapshot.fake(10.0)),
                  compress=Codec.ZSTD)
    backing = Backing.open(os.path.join(disk_dir, "b"), NPAGES * PAGE_SIZE)
    try:
        async with trio.open_nursery() as nursery:
            listener = await open_listener(Address("unix", path=str(tmp_path / "s")))
            server = Server(store, ServerConfig(handback_interval=60.0))
            [address] = await nursery.start(server.serve, [listener])
            client = HostClient(address, "c", NPAGES * PAGE_SIZE, backoff_min=0.01, backoff_max=0.05)
            pager = Pager(backing, client)
            await nursery.start(client.run)
            await client.wait_connected()
            assert client.sharing
            data = b"".join(jpage(i, 1) for i in range(128))
            await pager.write(0, data)
            await store.compressor.settle()
            assert store.stats()["compression"]["compr_data_bytes"] < 128 * PAGE_SIZE // 2
            assert await pager.read(0, 128 * PAGE_SIZE) == data
            assert pager.stats()["shared_reads"] == 128 and store.counters[HostCounter.GET_REQUESTS] == 0
            report = await server.drain()
            assert report["handed_back"] == {"c": 128} and store.pages == 0
            assert pager.map.counts()["backing"] == 128
            assert await pager.read(0, 128 * PAGE_SIZE) == data
            nursery.cancel_scope.cancel()
    finally:
        backing.close()
    _ = Drain


async def test_the_metrics_say_what_compression_saves(backing: Backing) -> None:
    from prometheus_client.core import Metric

    from hoststore.storemetrics import store_families

    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(32)))
    await store.store.compressor.settle()
    families: dict[str, Metric] = {f.name: f for f in store_families(store.store.stats(admin=True))}
    comp = store.stats()["compression"]
    assert families["vswap_store_orig_data_bytes"].samples[0].value == 32 * PAGE_SIZE
    assert families["vswap_store_mem_used_bytes"].samples[0].value == comp["mem_used_bytes"]
    [client] = families["vswap_store_client_mem_used_bytes"].samples
    assert client.labels == {"client": "test"} and client.value == comp["mem_used_bytes"]
    assert families["vswap_store_compress_seconds"].samples[0].value > 0


async def test_a_page_rewritten_while_it_is_compressed_keeps_its_new_version(backing: Backing) -> None:
    """The compressor's thread works on a copy: pages rewritten, discarded or handed back
    meanwhile are left as they now are, never overwritten with the old version."""
    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(16)))
    compressor = store.store.compressor
    entered, release = threading.Event(), threading.Event()
    real = compressor._encode_fast

    def held(client, pages):  # noqa: ANN001, ANN202 - in the worker thread
        entered.set()
        release.wait(10)
        return real(client, pages)

    compressor._encode_fast = held
    done: list[int] = []

    async def settle() -> None:
        done.append(await compressor.settle())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle)
        await trio.to_thread.run_sync(entered.wait, 10)
        await pager.write(0, b"".join(jpage(i, 2) for i in range(4)))  # rewritten
        await pager.discard(4 * PAGE_SIZE, 4 * PAGE_SIZE)  # dropped
        release.set()
    # 8 unchanged pages compressed from the first round, then the 4 new versions in their own
    assert done == [12]
    store.client.zslab.check()
    want = [jpage(i, 2) for i in range(4)] + [bytes(PAGE_SIZE)] * 4 + [jpage(i, 1) for i in range(8, 16)]
    assert await pager.read(0, 16 * PAGE_SIZE) == b"".join(want)
    assert store.stats()["compression"]["pending_pages"] == 0 and store.stats()["pages_stored"] == 12


async def recompress(store: InprocStore, idle: Idle, budget: int = 10_000) -> int:
    """One round over every page used so far."""
    inner = store.store
    return await inner.compressor.recompress_round(idle, [store.client], inner.next_stamp(), budget)


async def test_idle_pages_are_recompressed_harder_and_still_read_from_shared_memory(backing: Backing) -> None:
    pager, store = make(backing)
    data = [jpage(i, 1) for i in range(NPAGES)]
    await pager.write(0, b"".join(data))
    await store.store.compressor.settle()
    before = store.stats()["compression"]
    first = await recompress(store, Idle(after=1.0), budget=100)
    z = store.client.zslab
    assert 0 < first <= 100 and sum(z.is_hard(s) for s in range(z.used)) == 100  # the rate bounds the work
    rest = await recompress(store, Idle(after=1.0))
    assert await recompress(store, Idle(after=1.0)) == 0 and all(z.is_hard(s) for s in range(z.used))  # each once
    stats = store.stats()
    assert stats["recompressed_pages"] == first + rest
    assert stats["compression"]["compr_data_bytes"] < before["compr_data_bytes"]
    assert stats["compression"]["charged_bytes"] <= before["charged_bytes"]  # never bigger
    store.client.zslab.check()
    reads = pager.stats()["shared_reads"]
    assert await pager.read(0, NPAGES * PAGE_SIZE) == b"".join(data)
    assert pager.stats()["shared_reads"] == reads + NPAGES


async def test_a_trained_dictionary_shrinks_idle_pages(backing: Backing) -> None:
    """(In process the store's dictionary is at hand; a daemon's client asks for such
    pages over the wire: test_compress.py.)"""
    pager, store = make(backing)
    data = [jpage(i, 1) for i in range(NPAGES)]
    await pager.write(0, b"".join(data))
    await store.store.compressor.settle()
    plain = store.stats()["compression"]["compr_data_bytes"]
    assert await recompress(store, Idle(after=1.0, dictionary=True, samples=128)) > NPAGES * 0.9
    z = store.client.zslab
    assert z.dictionary is not None and z.encoding(0) == Codec.ZSTD_DICT
    comp = store.stats()["compression"]
    assert comp["compr_data_bytes"] < 0.9 * plain
    assert comp["mem_used_bytes"] >= z.classes.mem_bytes + len(z.dictionary.as_bytes())
    assert await pager.read(0, NPAGES * PAGE_SIZE) == b"".join(data)
    got = await store.get(array("Q", range(64)))
    assert bytes(got.data) == b"".join(data[:64]) and pager.stats()["checksum_errors"] == 0
    # a page rewritten goes in with the fast setting again
    await pager.write(0, jpage(0, 2))
    await store.store.compressor.settle()
    assert z.encoding(store.client.index.get(0)) == Codec.ZSTD
    assert await pager.read(0, PAGE_SIZE) == jpage(0, 2)


async def test_only_pages_idle_long_enough_are_recompressed(backing: Backing, autojump_clock) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(64)))
    await store.store.compressor.settle()
    inner = store.store
    async with trio.open_nursery() as nursery:
        await nursery.start(inner.compressor.recompress_idle, Idle(after=30.0, rate=1000.0),
                            lambda: [store.client], lambda: inner._stamp)
        await trio.sleep(20)
        assert inner.counters[HostCounter.RECOMPRESSED] == 0  # not idle long enough yet
        await pager.write(0, b"".join(jpage(i, 2) for i in range(8)))  # these are used again
        await store.store.compressor.settle()
        await trio.sleep(15)
        z = store.client.zslab
        hard = {store.client.page_of[s] for s in range(z.used) if z.is_hard(s)}
        assert hard == set(range(8, 64))  # the pages used again are not idle yet
        await trio.sleep(30)
        assert all(z.is_hard(s) for s in range(z.used))
        nursery.cancel_scope.cancel()
    assert await pager.read(0, 64 * PAGE_SIZE) == b"".join(
        [jpage(i, 2) for i in range(8)] + [jpage(i, 1) for i in range(8, 64)])


async def test_a_rewrite_needs_room_as_a_new_page_does(backing: Backing) -> None:
    """Kept compressed, a new version goes in as a whole page: at capacity it is refused
    (and the old copy dropped), never let past the capacity."""
    pager, store = make(backing, capacity=8)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(16)))
    await store.store.compressor.settle()
    stats = store.stats()
    accepted = stats["accepted"]
    for first in range(0, 16, 4):  # rewritten with pages that do not shrink
        await pager.write(first * PAGE_SIZE, b"".join(noise(i, 2) for i in range(first, first + 4)))
    stats = store.stats()
    assert stats["compression"]["charged_bytes"] <= 8 * PAGE_SIZE
    assert stats["refused_capacity"] > 0 and stats["accepted"] > accepted
    assert await pager.read(0, 16 * PAGE_SIZE) == b"".join(noise(i, 2) for i in range(16))


async def test_a_page_being_handed_back_is_compressed_all_the_same(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(8)))
    inner = store.store
    handback = await inner.lend(store.client, HandBackCause.PRESSURE, 4)
    assert handback is not None and store.stats()["compression"]["pending_pages"] == 8
    assert await inner.compressor.settle() == 8
    inner.unlend(store.client, handback)  # the client could not take them: they stay, compressed
    assert store.stats()["compression"]["pending_pages"] == 0
    store.client.zslab.check()
    assert await pager.read(0, 8 * PAGE_SIZE) == b"".join(jpage(i, 1) for i in range(8))


async def test_a_damaged_page_teaches_the_dictionary_nothing_and_stops_nothing(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(jpage(i, 1) for i in range(NPAGES)))
    await store.store.compressor.settle()
    damage(store, 7)
    done = await recompress(store, Idle(after=1.0, dictionary=True, samples=NPAGES))
    assert 0 < done <= NPAGES - 1 and store.client.zslab.dictionary is not None  # trained on the 255 others
    assert await recompress(store, Idle(after=1.0, dictionary=True)) == 0
    assert store.stats()["recompressed_pages"] == done
    with pytest.raises(PageUnavailable):
        await pager.read(7 * PAGE_SIZE, PAGE_SIZE)


async def test_a_refused_rewrite_frees_its_room_for_the_next_page_of_the_put(backing: Backing) -> None:
    pager, store = make(backing, capacity=2)
    await pager.write(0, noise(0, 1) + noise(1, 1))  # full: two pages that do not shrink
    await store.store.compressor.settle()
    await pager.write(0, noise(0, 2) + noise(1, 2))  # 0: no room, refused and its old copy dropped; 1: that room
    stats = store.stats()
    assert stats["refused_capacity"] == 1 and stats["accepted"] == 3 and stats["pages_stored"] == 1
    assert await pager.read(0, 2 * PAGE_SIZE) == noise(0, 2) + noise(1, 2)


def test_a_recompression_that_would_not_shrink_a_page_keeps_its_bytes() -> None:
    from hoststore.clientpages import ClientPages
    from hoststore.compressor import Compressor
    from pagewire.codec import encode

    client = ClientPages("c", 16, "i", b"s" * 32, compress=Codec.ZSTD)
    page = jpage(3, 1)
    client.add(3, 1, encode(page, Codec.ZSTD), 1)
    z = client.zslab
    cost, blob, where = z.class_bytes(0), bytes(z.encoded_view(0)), z._where(0)
    assert Compressor._put_back(client, 0, (Codec.RAW, page), pending=False) == 0  # a whole page: bigger
    assert z.class_bytes(0) == cost and bytes(z.encoded_view(0)) == blob and z.is_hard(0)
    assert z._where(0) >> 3 == where >> 3  # not moved: the same bytes at the same place
    out = bytearray(PAGE_SIZE)
    client.slab.read_into(0, out)
    assert out == page
    z.check()
