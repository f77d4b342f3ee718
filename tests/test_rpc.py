"""Client and server over a real unix socket, the server started with nursery.start."""

from __future__ import annotations

import socket

import msgpack
import pytest
import trio

from hoststore import protocol as p
from hoststore.address import Address
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.server import open_listener, serve
from hoststore.store import Store
from vswapfs.hostclient import HostClient, StoreError, StoreUnavailable, query

PAGE = p.PAGE_SIZE


def page(n: int) -> bytes:
    return n.to_bytes(8, "little") * (PAGE // 8)


def new_store(capacity: int = 64) -> Store:
    return Store(Limits(capacity_pages=capacity), Sampler(0, source=lambda: Snapshot.fake(10)))


async def start_server(nursery: trio.Nursery, path: str, store: Store) -> Address:
    listener = await open_listener(Address("unix", path=path))
    [address] = await nursery.start(serve, [listener], store)
    return address


async def start_client(nursery: trio.Nursery, address: Address, name: str = "c", npages: int = 128) -> HostClient:
    client = HostClient(address, name, npages * PAGE, backoff_min=0.01, backoff_max=0.05)
    await nursery.start(client.run)
    return client


async def test_put_get_invalidate_roundtrip(tmp_path) -> None:
    store = new_store()
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        client = await start_client(nursery, address)
        assert client.connected
        status = await client.put(10, 1, page(10) + page(11))
        assert status == bytes(2)
        st, data = await client.get([11, 10, 12])
        assert list(st) == [p.PageStatus.STORED, p.PageStatus.STORED, p.PageStatus.MISSING]
        assert data[: 2 * PAGE] == page(11) + page(10)
        assert await client.invalidate(10, 2, 1) == 2
        stats = await query(address, p.STATS, {})
        assert stats["pages_stored"] == 0 and stats["put_requests"] == 1 and stats["invalidated"] == 2
        nursery.cancel_scope.cancel()


async def test_pipelined_concurrent_batches(tmp_path) -> None:
    store = new_store(capacity=1024)
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        client = await start_client(nursery, address, npages=1024)
        results: dict[int, bytes] = {}

        async def writer(i: int) -> None:
            results[i] = await client.put(i * 8, i + 1, b"".join(page(i * 8 + k) for k in range(8)))

        async with trio.open_nursery() as inner:
            for i in range(100):
                inner.start_soon(writer, i)
        assert all(r == bytes(8) for r in results.values()) and len(results) == 100
        assert store.counters.put_requests == 100  # one request per batch, not per page
        _, data = await client.get(list(range(800)))
        assert data == b"".join(page(k) for k in range(800))
        nursery.cancel_scope.cancel()


async def test_malformed_message_closes_only_that_connection(tmp_path) -> None:
    store = new_store()
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        client = await start_client(nursery, address)
        bad = await trio.open_unix_socket(address.path)
        await bad.send_all(msgpack.packb([0, 0, p.HELLO, {"version": p.PROTOCOL_VERSION, "role": "observer"}]))
        await bad.receive_some(65536)
        await bad.send_all(b"\xc1\xc1\xc1")
        assert await bad.receive_some(65536) == b""  # closed by the server
        assert store.counters.protocol_errors == 1
        assert await client.put(0, 1, page(0)) == bytes(1)  # the pager's connection lives on
        nursery.cancel_scope.cancel()


async def test_hello_with_wrong_version_is_refused(tmp_path) -> None:
    store = new_store()
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        raw = await trio.open_unix_socket(address.path)
        await raw.send_all(msgpack.packb([0, 0, p.HELLO, {"version": 999}]))
        answer = msgpack.unpackb(await raw.receive_some(65536))
        assert answer[0] == p.RESPONSE and "version" in answer[2]
        assert await raw.receive_some(65536) == b""
        assert store.counters.hello_refused == 1
        nursery.cancel_scope.cancel()


async def test_request_errors_keep_the_connection(tmp_path) -> None:
    store = new_store()
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        client = await start_client(nursery, address, npages=4)
        with pytest.raises(StoreError, match="outside"):
            await client.put(4, 1, page(0))
        assert await client.put(3, 2, page(3)) == bytes(1)
        nursery.cancel_scope.cancel()


async def test_client_reconnects_after_server_restart(tmp_path) -> None:
    path = str(tmp_path / "s")
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as server_nursery:
            address = await start_server(server_nursery, path, new_store())
            client = await start_client(outer, address)
            await client.put(0, 1, page(0))
            first_instance = client.instance
            server_nursery.cancel_scope.cancel()
        with pytest.raises(StoreUnavailable):
            with trio.fail_after(5):
                while True:  # until the client notices the loss
                    await client.put(0, 2, page(0))
                    await trio.sleep(0.01)
        async with trio.open_nursery() as server_nursery:
            await start_server(server_nursery, path, new_store())
            with trio.fail_after(5):
                await client.wait_connected()
            assert client.instance != first_instance and client.counters.host_restarts == 1
            # The new store never had page 0: a read of it must report it missing.
            status, _ = await client.get([0])
            assert status == bytes([p.PageStatus.MISSING])
            server_nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_client_matches_out_of_order_answers(tmp_path) -> None:
    """A hand-rolled server that answers each burst of requests in reverse order."""
    path = str(tmp_path / "s")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1)

    async def reverse_server() -> None:
        conn_sock, _ = await sock.accept()
        stream = trio.SocketStream(conn_sock)
        conn = p.Connection("server")
        pending: list[p.Request] = []
        while True:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            conn.receive_data(data)
            while (event := conn.next_event()) is not None:
                if event.method == p.HELLO:
                    await stream.send_all(conn.accept_hello(event.msgid, {"instance": "x"}))
                else:
                    pending.append(event)
            if len(pending) >= 4:
                out = b"".join(conn.send_response(r.msgid, None, r.params[0][0]) for r in reversed(pending))
                pending.clear()
                await stream.send_all(out)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reverse_server)
        client = await start_client(nursery, Address("unix", path=path))
        got: dict[int, int] = {}

        async def ask(i: int) -> None:
            got[i] = await client.call(p.GET, [[i]])

        async with trio.open_nursery() as inner:
            for i in range(4):
                inner.start_soon(ask, i)
        assert got == {0: 0, 1: 1, 2: 2, 3: 3}
        nursery.cancel_scope.cancel()


async def test_unreachable_store_fails_fast(tmp_path) -> None:
    async with trio.open_nursery() as nursery:
        client = await start_client(nursery, Address("unix", path=str(tmp_path / "nobody")))
        assert not client.connected
        with pytest.raises(StoreUnavailable):
            await client.put(0, 1, page(0))
        assert client.counters.connect_failures >= 1
        nursery.cancel_scope.cancel()


async def test_refused_hello_is_retried_not_fatal(tmp_path) -> None:
    """A second pager under a name in use is refused at hello; its client keeps
    retrying in the background instead of dying, and connects once the name is free."""
    store = new_store()
    async with trio.open_nursery() as nursery:
        address = await start_server(nursery, str(tmp_path / "s"), store)
        async with trio.open_nursery() as first_nursery:
            first = await start_client(first_nursery, address, name="same")
            second = await start_client(nursery, address, name="same")
            with trio.fail_after(5):
                while second.counters.connect_failures < 3:
                    await trio.sleep(0.01)
            assert first.connected and not second.connected and store.counters.hello_refused >= 3
            first_nursery.cancel_scope.cancel()
        # The second client is a different session: once the name is free it attaches.
        with trio.fail_after(5):
            await second.wait_connected()
        nursery.cancel_scope.cancel()


async def test_query_against_a_silent_server_times_out_cleanly(tmp_path) -> None:
    path = str(tmp_path / "silent")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1)  # accepts connections, never answers
    with pytest.raises(StoreUnavailable, match="did not answer"):
        await query(Address("unix", path=path), p.STATS, {}, timeout=0.2)
    sock.close()
