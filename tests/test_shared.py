"""Shared page memory: the store's slots in a memfd its one client maps read-only
and reads without a round trip, seqlock style (``pagewire.sharedmem``)."""

from __future__ import annotations

import fcntl
import mmap
import multiprocessing
import os
import random
import socket
import struct
import time
from array import array
from collections.abc import Callable
from typing import Any

import pytest
import trio

from pagewire.access import IN_PROCESS
from pagewire.address import Address
from hoststore.clientpages import ClientPages
from pagewire.messages import PAGE_SIZE, SharedLayout
from hoststore.sharedslab import SharedSlab
from pagewire.sharedmem import STAGING_PAGES, SharedError, SharedPages
from hoststore.store import Store

from .test_rpc import new_store, start_server

NPAGES = 4096


def page(n: int, version: int) -> bytes:
    return random.Random(n * 7919 + version).randbytes(PAGE_SIZE)


def shared_client(npages: int = NPAGES, slots: int = NPAGES, chunk_pages: int = 64) -> ClientPages:
    client = ClientPages("c", npages, "i", b"s" * 32, shared_slots=slots)
    assert client.shared is not None
    client.slab.close()
    client.slab = SharedSlab(npages, slots, chunk_pages=chunk_pages)  # small chunks: memory moves sooner
    return client


def reader_of(client: ClientPages) -> SharedPages:
    shared = client.shared
    assert shared is not None
    return SharedPages(os.dup(shared.fd), shared.layout)


def read(reader: SharedPages, n: int, version: int) -> bytes | None:
    out = bytearray(PAGE_SIZE)
    return bytes(out) if reader.read(n, version, memoryview(out)) else None


def test_a_reader_sees_exactly_the_versions_the_store_holds() -> None:
    client = shared_client()
    reader = reader_of(client)
    client.add(5, 1, page(5, 1), 1)
    assert read(reader, 5, 1) == page(5, 1)
    assert read(reader, 5, 2) is None  # not that version
    assert read(reader, 6, 1) is None  # not stored
    client.replace(client.index.get(5), 2, page(5, 2), 2)
    assert read(reader, 5, 1) is None and read(reader, 5, 2) == page(5, 2)
    client.remove(client.index.get(5))
    assert read(reader, 5, 2) is None
    assert read(reader, NPAGES + 10, 1) is None  # past the device: refused, never a fault


def test_pages_moved_by_a_removal_are_found_in_their_new_slot() -> None:
    client = shared_client()
    reader = reader_of(client)
    for n in range(10):
        client.add(n, 1, page(n, 1), n)
    client.remove(client.index.get(3))  # the last page (9) moves into slot 3
    assert client.index.get(9) == 3
    assert read(reader, 9, 1) == page(9, 1) and read(reader, 3, 1) is None
    for n in (0, 1, 2, 4, 5, 6, 7, 8):
        assert read(reader, n, 1) == page(n, 1)


def test_random_operations_keep_the_reader_and_the_store_in_agreement() -> None:
    rng = random.Random(4)
    client = shared_client(npages=512, slots=512, chunk_pages=8)
    reader = reader_of(client)
    truth: dict[int, int] = {}
    seq = 0
    for _ in range(3000):
        n = rng.randrange(512)
        seq += 1
        slot = client.index.get(n)
        action = rng.random()
        if action < 0.5:
            if slot < 0:
                client.add(n, seq, page(n, seq), seq)
            else:
                client.replace(slot, seq, page(n, seq), seq)
            truth[n] = seq
        elif slot >= 0:
            client.remove(slot)
            del truth[n]
    client.check()
    for n in range(512):
        if n in truth:
            assert read(reader, n, truth[n]) == page(n, truth[n])
            assert read(reader, n, truth[n] - 1) is None
        else:
            assert all(read(reader, n, v) is None for v in (1, seq))


def test_freed_slots_give_their_memory_back() -> None:
    client = shared_client(chunk_pages=64)
    fd = client.shared.fd
    for n in range(1024):
        client.add(n, 1, page(n, 1), n)
    full = os.fstat(fd).st_blocks * 512
    assert full >= 1024 * PAGE_SIZE
    for n in range(1024):
        client.remove(client.index.get(n))
    empty = os.fstat(fd).st_blocks * 512
    # What stays: at most one spare chunk of data, plus the header and index pages.
    assert empty <= 64 * PAGE_SIZE + client.shared.layout.data_offset
    assert client.slab.mapped_bytes <= 64 * PAGE_SIZE


def _resident_kib(mapping_name: str) -> list[int]:
    """Rss of each of this process's mappings of ``mapping_name`` (from /proc/self/smaps)."""
    found, current = [], ""
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and line[0] in "0123456789abcdef":
                current = line
            elif line.startswith("Rss:") and mapping_name in current:
                found.append(int(line.split()[1]))
    return found


def test_every_staging_page_stays_mapped_in_the_store() -> None:
    """The store maps every staging page itself, at once: a page the client alone had
    mapped would be swappable once the client re-maps, and the client's next write to
    it would wait for a swap-in from the device it serves."""
    before = _resident_kib("hoststore-staging")
    slab = SharedSlab(1024, 64)
    try:
        after = _resident_kib("hoststore-staging")
        assert len(after) == len(before) + 1
        assert max(after) >= STAGING_PAGES * PAGE_SIZE // 1024
        staging_fd = slab.staging_fd
        assert os.fstat(staging_fd).st_blocks * 512 >= STAGING_PAGES * PAGE_SIZE
    finally:
        slab.close()


def test_staging_goes_back_while_its_client_is_away_and_is_resident_again_on_its_return() -> None:
    store = new_store()
    client = shared_client()
    store.clients[client.name] = client
    staging = client.shared.staging_fd
    full = STAGING_PAGES * PAGE_SIZE
    session = object()
    store.bind(client, session)
    assert os.fstat(staging).st_blocks * 512 >= full
    store.detach(client, object())  # not its session: nothing changes
    assert os.fstat(staging).st_blocks * 512 >= full
    store.detach(client, session)
    assert os.fstat(staging).st_blocks == 0
    store.bind(client, object())
    assert os.fstat(staging).st_blocks * 512 >= full


def test_the_memory_is_sealed_and_a_bad_one_is_refused() -> None:
    client = shared_client()
    seals = fcntl.fcntl(client.shared.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(OSError):
        os.ftruncate(client.shared.fd, 4096)  # nobody, the store included, can shrink it
    layout = SharedLayout(64, 64)
    unsealed = os.memfd_create("t")
    os.ftruncate(unsealed, layout.size)
    with pytest.raises(SharedError, match="not sealed"):
        SharedPages(unsealed, layout)
    small = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(small, layout.size - PAGE_SIZE)
    fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(SharedError, match="smaller"):
        SharedPages(small, layout)


def test_the_client_maps_it_read_only() -> None:
    client = shared_client()
    reader = reader_of(client)
    client.add(1, 1, page(1, 1), 1)
    with pytest.raises(TypeError):
        reader._data[0:1] = b"x"  # noqa: SLF001 - the mapping itself refuses writes


# -- over a real unix socket -------------------------------------------------------------------


async def test_a_client_reads_the_stores_pages_without_asking(tmp_path) -> None:
    from vswapfs.hostclient import HostClient, LinkCounter

    store = new_store(capacity=256)
    async with trio.open_nursery() as nursery:
        address, _server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        client = HostClient(address, "c", 128 * PAGE_SIZE, backoff_min=0.01, backoff_max=0.05)
        await nursery.start(client.run)
        await client.wait_connected()
        assert client.sharing and client.counters[LinkCounter.SHARED_MAPS] == 1
        data = b"".join(page(n, 3) for n in range(16))
        assert await client.put(0, 3, data) == bytes(16)
        gets_before = store.counters["get_requests"]
        out = bytearray(PAGE_SIZE)
        for n in range(16):
            assert client.read_shared(n, 3, memoryview(out)) and bytes(out) == page(n, 3)
        assert store.counters["get_requests"] == gets_before  # no round trip
        assert store.stats(admin=True)["clients"]["c"]["shared_memory"] is True
        nursery.cancel_scope.cancel()


async def test_without_sharing_every_read_goes_over_the_wire(tmp_path) -> None:
    from vswapfs.hostclient import HostClient

    store = new_store(capacity=256)
    async with trio.open_nursery() as nursery:
        address, _server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        client = HostClient(address, "c", 128 * PAGE_SIZE, share=False)
        await nursery.start(client.run)
        await client.wait_connected()
        await client.put(0, 1, page(0, 1))
        assert not client.sharing and not client.read_shared(0, 1, memoryview(bytearray(PAGE_SIZE)))
        answer = await client.get(array("Q", [0]))
        assert bytes(answer.data) == page(0, 1)
        assert store.stats(admin=True)["clients"]["c"]["shared_memory"] is False
        nursery.cancel_scope.cancel()


async def test_a_reconnect_maps_the_same_pages_and_a_new_store_lets_the_old_go(tmp_path) -> None:
    from vswapfs.hostclient import HostClient, LinkCounter

    path = str(tmp_path / "s.sock")
    out = memoryview(bytearray(PAGE_SIZE))
    store = new_store(capacity=256)
    async with trio.open_nursery() as outer:
        client = HostClient(Address("unix", path=path), "c", 128 * PAGE_SIZE, backoff_min=0.01, backoff_max=0.05)
        async with trio.open_nursery() as nursery:
            await start_server(nursery, path, store)
            await outer.start(client.run)
            await client.wait_connected()
            await client.put(7, 1, page(7, 1))
            session = store.clients["c"].session
            session.stop()  # the store drops the connection; it keeps the pages
            with trio.move_on_after(5):
                while client.counters[LinkCounter.SHARED_MAPS] < 2:
                    await trio.sleep(0.01)
            assert client.counters[LinkCounter.SHARED_MAPS] == 2, (client.counters.as_dict(), store.counters.as_dict())
            assert client.read_shared(7, 1, out) and bytes(out) == page(7, 1)
            nursery.cancel_scope.cancel()
        store.close()
        os.unlink(path)
        store2 = new_store(capacity=256)
        async with trio.open_nursery() as nursery:
            await start_server(nursery, path, store2)
            with trio.fail_after(5):
                while client.counters[LinkCounter.SHARED_MAPS] < 3:
                    await trio.sleep(0.01)
            assert not client.read_shared(7, 1, out), client.counters.as_dict()  # a new store: its memory holds nothing of ours
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_file_descriptors_a_client_sends_are_never_kept_by_the_store(tmp_path) -> None:
    store = new_store()
    async with trio.open_nursery() as nursery:
        address, _server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        before = len(os.listdir("/proc/self/fd"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.path)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
        sock.sendmsg([b"\x00\x00\x00\x05hello"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))])
        for fd in fds:
            os.close(fd)
        with trio.fail_after(5):
            while store.counters["protocol_errors"] < 1:
                await trio.sleep(0.01)
        sock.close()
        with trio.fail_after(5):  # none of the 8 is held anywhere in this process, once the store closed them
            while len(os.listdir("/proc/self/fd")) > before:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def test_a_store_gives_shared_memory_only_where_asked_and_possible() -> None:
    from pagewire.messages import PROTOCOL_VERSION, ROLE_PAGER, Hello

    store: Store = new_store(capacity=32)

    def hello(name: str, shared: bool) -> Hello:
        return Hello(PROTOCOL_VERSION, name, ROLE_PAGER, 64 * PAGE_SIZE, "i" + name, os.urandom(16), shared=shared)

    client, answer, _ = store.attach(hello("a", True), os.urandom(16), can_share=True, owner=IN_PROCESS)
    assert answer.shared == SharedLayout(64, 64, STAGING_PAGES)  # slots: up to the device (the capacity may grow)
    _, answer, _ = store.attach(hello("b", True), os.urandom(16), can_share=False, owner=IN_PROCESS)  # TCP
    assert answer.shared is None
    _, answer, _ = store.attach(hello("c", False), os.urandom(16), can_share=True, owner=IN_PROCESS)
    assert answer.shared is None
    store.close()


def test_mmap_of_the_layout_covers_every_part() -> None:
    layout = SharedLayout(1000, 300)
    assert layout.index_offset >= 300 * 16 and layout.data_offset >= layout.index_offset + 1000 * 4
    assert layout.size == layout.data_offset + 300 * PAGE_SIZE
    assert layout.data_offset % mmap.PAGESIZE == 0


def _cell_page(n: int, seq: int) -> bytes:
    return struct.pack("<QQ", n, seq) * (PAGE_SIZE // 16)


def _churn(client: ClientPages, seconds: float, seed: int, stored: Callable[[int, int], Any], rewrite: float) -> None:
    """In a child process: the store's side changing pages as fast as it can (adds,
    replacements, removals that move the last page), with versions only ever growing;
    ``stored(page, version)`` is what goes into the slab."""
    rng = random.Random(seed)
    seq = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        n = rng.randrange(64)
        seq += 1
        slot = client.index.get(n)
        if slot < 0:
            client.add(n, seq, stored(n, seq), seq)
        elif rng.random() < rewrite:
            client.replace(slot, seq, stored(n, seq), seq)
        else:
            client.remove(slot)
    os._exit(0)


def test_reads_racing_a_store_that_changes_every_page_never_see_a_wrong_page() -> None:
    """The seqlock, across processes: whatever version the header names when the copy
    starts, a read that says yes returned exactly that version, never a torn or moved one."""
    client = shared_client(npages=64, slots=64, chunk_pages=4)
    reader = reader_of(client)
    for n in range(64):
        client.add(n, 1, _cell_page(n, 1), 1)
    hits, wrong = race_reader(reader, client, _cell_page)
    assert hits > 1000 and wrong == 0, (hits, wrong)


def race_reader(reader: SharedPages, client: ClientPages, expected: Callable[[int, int], bytes],
                stored: Callable[[int, int], Any] | None = None, rewrite: float = 0.7) -> tuple[int, int]:
    """Read pages 0..63 at whatever version their header names while a child process
    changes them for 2 s (``_churn``); (reads that said yes, of those the wrong ones)."""
    child = multiprocessing.get_context("fork").Process(
        target=_churn, args=(client, 2.0, 9, stored or expected, rewrite))
    child.start()
    hits = wrong = 0
    out = bytearray(PAGE_SIZE)
    view = memoryview(out)
    rng = random.Random(3)
    words = client.shared.layout.header_words
    while child.is_alive():
        n = rng.randrange(64)
        slot = reader._index[n] - 1  # noqa: SLF001 - peek at the version the store names now
        if slot < 0:
            continue
        seq = reader._headers[words * slot]  # noqa: SLF001
        if seq and reader.read(n, seq, view):
            hits += 1
            wrong += bytes(out) != expected(n, seq)
    child.join()
    assert child.exitcode == 0
    return hits, wrong


# -- puts through the staging area ---------------------------------------------------------------


async def test_puts_go_through_the_staging_area_and_fall_back_to_the_wire_when_it_is_full(tmp_path) -> None:
    from pagewire.sharedmem import STAGING_PAGES
    from vswapfs.hostclient import HostClient, LinkCounter

    store = new_store(capacity=256)
    async with trio.open_nursery() as nursery:
        address, _server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        client = HostClient(address, "c", 128 * PAGE_SIZE)
        await nursery.start(client.run)
        await client.wait_connected()
        assert await client.put(0, 1, b"".join(page(n, 1) for n in range(8))) == bytes(8)
        assert client.counters[LinkCounter.STAGED_PUT_PAGES] == 8
        staging = client._shared.staging  # noqa: SLF001
        assert staging.in_use == 0  # given back with the answer
        hold = staging.take(STAGING_PAGES)  # someone else has it all: the next put goes on the wire
        assert await client.put(8, 2, page(8, 2)) == bytes(1)
        assert client.counters[LinkCounter.STAGED_PUT_PAGES] == 8
        staging.give(hold, STAGING_PAGES)
        answer = await client.get(array("Q", range(9)))
        assert bytes(answer.data) == b"".join(page(n, 1) for n in range(8)) + page(8, 2)
        nursery.cancel_scope.cancel()


async def test_a_staged_put_outside_the_staging_area_or_without_one_is_an_error(tmp_path) -> None:
    from pagewire.messages import PutStaged
    from vswapfs.hostclient import HostClient
    from vswapfs.pagestore import StoreError

    store = new_store(capacity=256)
    async with trio.open_nursery() as nursery:
        address, _server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        shared = HostClient(address, "a", 128 * PAGE_SIZE)
        plain = HostClient(address, "b", 128 * PAGE_SIZE, share=False)
        for client in (shared, plain):
            await nursery.start(client.run)
            await client.wait_connected()
        staging = shared._shared.staging  # noqa: SLF001
        with pytest.raises(StoreError, match="outside"):
            await shared.call(PutStaged(0, 1, staging.pages - 1, 2))
        with pytest.raises(StoreError, match="needs shared memory"):
            await plain.call(PutStaged(0, 1, 0, 1))
        assert await shared.put(0, 2, page(0, 2)) == bytes(1)  # both connections go on
        assert await plain.put(0, 2, page(0, 2)) == bytes(1)
        assert store.counters["bad_requests"] == 2 and store.pages == 2
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_lets_the_shared_memory_go_until_the_reconnect(tmp_path) -> None:
    """Once the store may be gone, its memory is no longer locked by it and could be
    swapped out (perhaps to a device we serve): never touched while disconnected."""
    from vswapfs.hostclient import HostClient, LinkCounter

    store = new_store(capacity=256)
    out = memoryview(bytearray(PAGE_SIZE))
    async with trio.open_nursery() as nursery:
        address, server = await start_server(nursery, str(tmp_path / "s.sock"), store)
        client = HostClient(address, "c", 128 * PAGE_SIZE, backoff_min=0.5, backoff_max=0.5)
        await nursery.start(client.run)
        await client.wait_connected()
        await client.put(3, 1, page(3, 1))
        store.clients["c"].session.stop()
        with trio.fail_after(5):
            while client.connected:
                await trio.sleep(0.005)
        assert not client.sharing and not client.read_shared(3, 1, out)
        await client.wait_connected()
        assert client.counters[LinkCounter.SHARED_MAPS] == 2 and client.read_shared(3, 1, out)
        nursery.cancel_scope.cancel()


def test_a_client_replaced_again_and_again_leaks_no_file_descriptor() -> None:
    from pagewire.messages import PROTOCOL_VERSION, ROLE_PAGER, Hello

    store: Store = new_store(capacity=32)
    counts = []
    for i in range(40):
        hello = Hello(PROTOCOL_VERSION, "c", ROLE_PAGER, 64 * PAGE_SIZE, f"instance-{i}", os.urandom(16),
                      shared=True)
        client, answer, _ = store.attach(hello, os.urandom(16), can_share=True, owner=IN_PROCESS)
        assert answer.shared is not None
        store.bind(client, object())
        store.detach(client, client.session)  # away with nothing: the next instance replaces it
        counts.append(len(os.listdir("/proc/self/fd")))
    assert counts[-1] == counts[5], counts  # steady, not 2 more per instance
    store.close()


async def test_a_peer_let_in_by_allow_uid_gets_no_shared_memory(tmp_path, monkeypatch) -> None:
    """Only root or the store's own user get the store's memfds: a client holding them
    could make the store fault on pages of its choosing."""
    from pagewire import access
    from vswapfs.hostclient import HostClient

    me = os.geteuid()
    monkeypatch.setattr(access.Access, "own_uids", property(lambda self: frozenset({me + 4242})))
    store = new_store(capacity=256)
    async with trio.open_nursery() as nursery:
        listener_access = access.Access(allowed_uids=frozenset({me}))
        from hoststore.server import Server, ServerConfig, open_listener

        listener = await open_listener(Address("unix", path=str(tmp_path / "s.sock")), listener_access)
        server = Server(store, ServerConfig(), access=listener_access)
        [address] = await nursery.start(server.serve, [listener])
        client = HostClient(address, "c", 128 * PAGE_SIZE)
        await nursery.start(client.run)
        await client.wait_connected()
        assert not client.sharing
        assert await client.put(0, 1, page(0, 1)) == bytes(1)  # on the wire, as ever
        assert store.stats(admin=True)["clients"]["c"]["shared_memory"] is False
        nursery.cancel_scope.cancel()
