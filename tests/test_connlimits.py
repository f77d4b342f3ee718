"""What a crowd of peers can take from a store: connection pools (hoststore.pools)
and the bytes it holds for unfinished messages (pagewire.endpoint.InFlight).

Servers run in the test's nursery (``nursery.start``); hand-made TCP peers connect
from several loopback addresses (127.0.0.2 ...), as any local process can.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from functools import partial
from array import array

import pytest
import trio
import trio.testing

from pagewire import auth
from pagewire import protocol as p
from pagewire.access import Access, host_key
from pagewire.address import Address
from vswapcommon.counters import Counters
from pagewire.endpoint import Endpoint, InFlight, PeerGone
from pagewire.messages import (
    MAX_GET_PAGES,
    MAX_PUT_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    ROLE_PAGER,
    Get,
    Drain,
    Hello,
    Put,
    Stats,
    Welcome,
)
from hoststore.pools import POOLS, Pool, Pools, first_pool, pool_limit
from hoststore.server import Server, ServerConfig, open_listener
from hoststore.store import HostCounter, Store
from vswapfs.hostclient import HostClient, LinkCounter, query
from vswapfs.pagestore import StoreError

from .test_rpc import new_store as pressured_store
from .test_drain import FOREVER, backings, pager_on, read_back  # noqa: F401 (backings: a fixture)
from .test_drain import start_server as drain_server
from .test_access import INSECURE, TOKEN, answer_of, closed_by_server, new_store, page, start_client

SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]  # six loopback addresses: still one host


async def start_server(nursery: trio.Nursery, tmp_path, store: Store, access: Access = INSECURE,
                       **config) -> tuple[Address, Address, Server]:
    """A server on loopback TCP (tokenless only as --insecure-tcp accepts it) and on a
    unix socket; (tcp, unix, server)."""
    listeners = [await open_listener(Address("tcp", host="127.0.0.1", port=0), access),
                 await open_listener(Address("unix", path=str(tmp_path / "s")), access)]
    server = Server(store, ServerConfig(**config), access)
    tcp, unix = await nursery.start(server.serve, listeners)
    return tcp, unix, server


async def next_event(stream: trio.SocketStream, conn: p.Connection) -> p.Event:
    while (event := conn.next_event()) is None:
        data = await stream.receive_some(1 << 16)
        if not data:
            raise EOFError("closed by the store")
        conn.receive_data(data)
    return event


async def peer(port: int, source: str, say_hello: bool, token: bytes | None = None,
               name: str | None = None) -> tuple[trio.SocketStream, p.Connection] | None:
    """A TCP peer from ``source``: welcomed (and past its hello if ``say_hello``), or None
    if the store closed it or refused its hello."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    conn = p.Connection("client")
    try:
        with trio.fail_after(5):
            welcome = await next_event(stream, conn)
            assert isinstance(welcome, Welcome)
            if say_hello:
                name = name or f"crowd-{os.urandom(4).hex()}"
                nonce = auth.nonce()
                proof = auth.token_proof(token, "client", name, welcome.nonce, nonce) if token else None
                hello = Hello(PROTOCOL_VERSION, name, ROLE_PAGER, 4096 * PAGE_SIZE, "i", nonce, auth=proof)
                await stream.send_all(conn.send_request(hello)[1])
                if (await next_event(stream, conn)).error is not None:
                    raise EOFError("hello refused")
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()
        return None
    return stream, conn


async def crowd(port: int, n: int, say_hello: bool, token: bytes | None = None
                ) -> list[tuple[trio.SocketStream, p.Connection]]:
    """``n`` peers at once, from six loopback addresses in turn; those the store kept."""
    held: list[tuple[trio.SocketStream, p.Connection]] = []

    async def one(i: int) -> None:
        got = await peer(port, SOURCES[i % len(SOURCES)], say_hello, token)
        if got is not None:
            held.append(got)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return held


async def good_unix_clients_are_served(nursery: trio.Nursery, unix: Address, token: bytes | None = None) -> None:
    """An admin observer gets every client's stats, and a pager puts and reads pages back."""
    with trio.fail_after(5):
        stats = await query(unix, Stats(), token=token)
    assert "clients" in stats  # the admin view
    pager = await start_client(nursery, unix, "pager-on-unix", token=token)
    with trio.fail_after(5):
        await pager.wait_connected()
        assert await pager.put(0, 1, page(0) + page(1)) == bytes(2)
        assert (await pager.get(array("Q", [0, 1]))).data == page(0) + page(1)
    assert pager.counters[LinkCounter.CONNECTS] == 1


# -- pools -------------------------------------------------------------------------------


def test_loopback_is_one_host_whatever_address_it_uses() -> None:
    for address in ("127.0.0.1", "127.0.0.2", "127.255.3.4", "::1", "::ffff:127.0.0.9"):
        assert host_key(address) == "loopback", address
    assert host_key("10.0.0.1") == host_key("::ffff:10.0.0.1") == "address 10.0.0.1"
    assert host_key("10.0.0.2") != host_key("10.0.0.1")


def test_an_ipv6_host_is_its_slash_64() -> None:
    """A host can take any address of its /64: counted apart, each would multiply its limits."""
    assert host_key("2001:db8:1:2::1") == host_key("2001:db8:1:2:ffff:1:2:3") == "network 2001:db8:1:2::/64"
    assert host_key("2001:db8:1:3::1") != host_key("2001:db8:1:2::1")


def test_each_connection_starts_in_the_pool_of_what_is_known_of_it() -> None:
    access = Access(allowed_uids=frozenset({1234}))
    assert first_pool(None, access) is Pool.HELLO  # TCP proves itself at hello
    assert first_pool(0, access) is Pool.ADMIN
    assert first_pool(os.geteuid(), access) is Pool.ADMIN
    assert first_pool(1234, access) is Pool.UNIX
    assert first_pool(4321, access) is Pool.HELLO  # refused at its hello, meanwhile with the unproven
    assert pool_limit("tcp=9") == (Pool.TCP, 9)
    for bad, needle in (("9", "POOL=N"), ("web=9", "unknown connection pool"), ("tcp=0", "at least 1"),
                        ("tcp=x", "not a whole number")):
        with pytest.raises(ValueError, match=needle):
            pool_limit(bad)


class _Member:
    def __init__(self) -> None:
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def test_a_full_pool_refuses_a_newcomer_and_the_hello_pool_closes_its_oldest_instead() -> None:
    counters = Counters(HostCounter)
    pools = Pools({Pool.TCP: 1, Pool.HELLO: 2}, counters)
    assert pools.limits[Pool.ADMIN] == POOLS[Pool.ADMIN].default
    a, b, c = _Member(), _Member(), _Member()
    for m in (a, b, c):
        assert pools.join(m, Pool.HELLO)
    assert a.evicted and not b.evicted and not c.evicted  # the oldest went for the newest
    assert pools.pool_of(a) is None and pools.count(Pool.HELLO) == 2
    assert counters[HostCounter.CLOSED_HELLO_POOL] == 1
    assert pools.join(b, Pool.TCP) and pools.pool_of(b) is Pool.TCP and pools.count(Pool.HELLO) == 1
    assert not pools.join(c, Pool.TCP)  # the tcp pool is full: c's hello is refused, it stays where it was
    assert pools.pool_of(c) is Pool.HELLO and not c.evicted
    assert counters[HostCounter.REFUSED_TCP_CONNECTIONS] == 1
    pools.leave(b)
    assert pools.join(c, Pool.TCP) and len(pools) == 1


async def test_each_pool_refuses_only_its_own_kind_and_a_loopback_host_is_counted_once(tmp_path) -> None:
    """Replaces a test that took one pool for all listeners as given: there, TCP
    connections filled it and the unix socket's next connection was refused."""
    store = new_store()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(
            nursery, tmp_path, store, max_connections={Pool.ADMIN: 2, Pool.TCP: 2, Pool.HELLO: 8},
            max_connections_per_peer=3)
        held = [await peer(tcp.port, source, say_hello=True) for source in SOURCES[:2]]
        assert all(held) and server.pools.count(Pool.TCP) == 2
        assert await peer(tcp.port, SOURCES[2], say_hello=True) is None  # past hello: the tcp pool is full
        assert store.counters[HostCounter.REFUSED_TCP_CONNECTIONS] == 1
        assert store.counters[HostCounter.HELLO_REFUSED] == 1
        with trio.fail_after(5):
            while len(server.pools) > 2:  # the refused one is gone
                await trio.sleep(0.01)
        # Connections not past hello count apart from those that are: three more, from
        # three more 127 addresses, are the host's three of that kind, and a fourth is one too many.
        for source in SOURCES[3:6]:
            held.append(await peer(tcp.port, source, say_hello=False))
            assert held[-1] is not None
        assert server.pools.count(Pool.HELLO) == 3
        extra = await trio.open_tcp_stream("127.0.0.1", tcp.port, local_address=SOURCES[0])
        assert await closed_by_server(extra)
        assert store.counters[HostCounter.REFUSED_PEER_CONNECTIONS] == 1
        # The unix socket's admin pool is its own: the TCP crowd took none of it.
        admins = [await trio.open_unix_socket(unix.path) for _ in range(2)]
        third = await trio.open_unix_socket(unix.path)
        assert await closed_by_server(third)
        assert store.counters[HostCounter.REFUSED_ADMIN_CONNECTIONS] == 1
        await admins[0].aclose()
        with trio.fail_after(5):
            while server.pools.count(Pool.ADMIN) > 1:
                await trio.sleep(0.01)
        with trio.fail_after(5):
            assert "clients" in await query(unix, Stats())  # a slot freed: served again
        nursery.cancel_scope.cancel()


async def test_tcp_peers_from_many_loopback_addresses_cannot_lock_out_the_unix_socket(tmp_path) -> None:
    """The issue's reproduction, with the default limits: 300 tokenless hellos from
    127.0.0.2-7.  Loopback is one host, so at most --max-connections-per-peer of
    them stay; root's observer and a pager on the unix socket are served."""
    store = new_store()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store)
        held = await crowd(tcp.port, 300, say_hello=True)
        limit = ServerConfig().max_connections_per_peer
        assert 0 < len(held) <= limit
        c = store.counters
        assert c[HostCounter.REFUSED_PEER_CONNECTIONS] + c[HostCounter.REFUSED_CONNECTION_RATE] > 0
        await good_unix_clients_are_served(nursery, unix)
        nursery.cancel_scope.cancel()


async def test_connections_that_never_say_hello_cannot_keep_a_client_with_the_token_out(tmp_path) -> None:
    """With a token set, 300 connections from 127.0.0.2-7 that never say hello (and
    tokenless hellos, refused) hold no more than the small hello pool, whose oldest
    goes for each newcomer: a client with the token gets in over TCP, and the unix
    socket is served, long before any hello timeout (set to 30 s here) could help."""
    store = new_store()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN), hello_timeout=30.0)
        assert await crowd(tcp.port, 20, say_hello=True) == []  # no token: every hello refused
        assert store.counters[HostCounter.REFUSED_AUTH] == 20
        silent = await crowd(tcp.port, 300, say_hello=False)
        assert silent and server.pools.count(Pool.HELLO) <= POOLS[Pool.HELLO].default
        good = await start_client(nursery, tcp, "good-over-tcp", token=TOKEN)
        with trio.fail_after(5):
            await good.wait_connected()
            assert await good.put(0, 1, page(7)) == bytes(1)
            assert (await good.get(array("Q", [0]))).data == page(7)
        assert store.counters[HostCounter.CLOSED_HELLO_POOL] > 0
        assert server.pools.count(Pool.TCP) == 1
        await good_unix_clients_are_served(nursery, unix, TOKEN)
        nursery.cancel_scope.cancel()


# -- bytes in flight -------------------------------------------------------------------------


class _Holder:
    """Stalled ``stalled`` seconds now, and more as time passes if ``growing``."""

    def __init__(self, stalled: float, growing: bool = False) -> None:
        self._stalled = stalled
        self._since = trio.current_time() if growing else None
        self.shed_calls = 0

    def stalled(self, now: float) -> float:
        return self._stalled + (now - self._since if self._since is not None else 0.0)

    def shed(self) -> None:
        self.shed_calls += 1


async def test_past_the_in_flight_cap_the_connections_waited_for_longest_go_first() -> None:
    inflight = InFlight(cap=100)
    slow, slower, fast = _Holder(2.0), _Holder(9.0), _Holder(0.1)
    inflight.hold(slow, 40)
    inflight.hold(slower, 40)
    inflight.hold(fast, 10)
    assert inflight.total == 90 and not any(h.shed_calls for h in (slow, slower, fast))
    inflight.hold(fast, 30)  # 110: one must go, the one waited for longest
    assert (slower.shed_calls, slow.shed_calls, fast.shed_calls) == (1, 0, 0)
    assert inflight.total == 70
    inflight.hold(fast, 101)  # 141: the slow one, then, still over, the fast one itself
    assert (slow.shed_calls, fast.shed_calls) == (1, 1) and inflight.total == 0


async def test_past_the_in_flight_cap_a_peer_that_kept_us_waiting_less_than_the_floor_stays() -> None:
    inflight = InFlight(cap=100, floor=1.0)
    slow, prompt = _Holder(2.0), _Holder(0.2)
    inflight.hold(prompt, 90)
    inflight.hold(slow, 20)
    assert (slow.shed_calls, prompt.shed_calls) == (1, 0) and inflight.total == 90
    inflight.hold(prompt, 150)  # over the cap, but nobody kept us waiting a second: nobody goes
    assert prompt.shed_calls == 0 and inflight.total == 150
    inflight.hold(prompt, 0)
    assert inflight.total == 0


async def test_past_the_in_flight_cap_peers_are_closed_as_their_stalls_pass_the_floor(autojump_clock) -> None:
    """Nothing calls hold while peers stall: the watcher closes them when they pass the
    floor, the longest stalled first, and leaves the rest once the total fits."""
    inflight = InFlight(cap=100, floor=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inflight.watch)
        early, late, prompt = _Holder(0.5, growing=True), _Holder(0.0, growing=True), _Holder(0.0)
        start = trio.current_time()
        inflight.hold(early, 60)
        inflight.hold(late, 50)
        inflight.hold(prompt, 30)  # 140, nobody past the floor yet
        assert inflight.total == 140 and not early.shed_calls
        while not early.shed_calls:
            await trio.sleep(0.01)
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.11)  # when it passed the floor
        await trio.sleep(5)  # 80 fits: the others stay, however long they stall
        assert (early.shed_calls, late.shed_calls, prompt.shed_calls) == (1, 0, 0) and inflight.total == 80
        nursery.cancel_scope.cancel()


def stalled_put(conn: p.Connection, seq: int) -> bytes:
    """A legal put of the largest size, all but its last byte."""
    _, data = conn.send_request(Put(0, seq, os.urandom(MAX_PUT_PAGES * PAGE_SIZE)))
    return data[:-1]


async def still_open(stream: trio.SocketStream) -> bool:
    """The store has not closed ``stream`` (it never sends these peers anything)."""
    with trio.move_on_after(0.2):
        try:
            return await stream.receive_some(1) != b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return True


async def test_a_crowd_of_stalled_puts_is_held_under_the_in_flight_cap_the_oldest_closed_first(tmp_path) -> None:
    """Twelve peers with the token each send all but the last byte of the largest legal
    put and stall.  The store holds at most --max-in-flight of them (here 2 MiB: seven
    such frames) once they have stalled --shed-after, and closes the ones that have
    kept it waiting longest; a pager on the unix socket, putting batches larger than
    a wire put and reading 1 MiB answers, is served meanwhile from its own pool's
    budget (closing no TCP peer, and closed by none)."""
    store = new_store(capacity=1024)
    cap = 2 << 20
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN), max_in_flight=cap,
                                               frame_timeout=60.0, shed_after=0.2)
        inflight = server.inflight[Pool.TCP]
        stalled = []
        for i in range(12):
            got = await peer(tcp.port, SOURCES[i % len(SOURCES)], say_hello=True, token=TOKEN)
            assert got is not None
            stream, conn = got
            data = stalled_put(conn, 1)
            frame = len(data) + 1  # what each holds: its buffer is made for the whole frame
            kept = cap // frame
            await stream.send_all(data)
            stalled.append(stream)
            with trio.fail_after(5):  # the store has read all of it, and closed what it had to
                while inflight.total != min(i + 1, kept) * frame:
                    await trio.sleep(0.01)
        assert kept == 7
        for stream in stalled[:-kept]:  # the oldest went
            assert await closed_by_server(stream)
        for stream in stalled[-kept:]:  # the newest are still held, waiting
            assert await still_open(stream)
        assert store.counters[HostCounter.CLOSED_IN_FLIGHT] == len(stalled) - kept
        pager = await start_client(nursery, unix, "pager", npages=1024, token=TOKEN, share=False)
        with trio.fail_after(10):
            await pager.wait_connected()
            data = b"".join(page(i) for i in range(256))
            assert await pager.put(0, 1, data) == bytes(256)
            assert (await pager.get(array("Q", range(256)))).data == data
        assert pager.counters[LinkCounter.CONNECTS] == 1 and pager.counters[LinkCounter.DISCONNECTS] == 0
        assert store.counters[HostCounter.CLOSED_IN_FLIGHT] == len(stalled) - kept
        assert inflight.total <= cap
        nursery.cancel_scope.cancel()


async def test_answers_never_read_are_held_under_the_in_flight_cap(tmp_path) -> None:
    """Peers with the token that ask for the largest answers and never read them: each
    holds one answer the store cannot send.  The store keeps at most --max-in-flight
    of them (here 3 MiB: two 1 MiB answers and change) and closes the connections
    that have kept it waiting longest; a pager reading 1 MiB answers is served."""
    store = new_store(capacity=1024)
    cap = 3 << 20
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN), max_in_flight=cap,
                                               shed_after=0.2)
        inflight = server.inflight[Pool.TCP]
        unread = []
        for i in range(8):
            stream, conn = await peer(tcp.port, SOURCES[i % len(SOURCES)], say_hello=True, token=TOKEN)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            gets = [conn.send_request(Get(array("Q", range(MAX_GET_PAGES))))[1] for _ in range(16)]
            await stream.send_all(conn.send_request(Put(0, 1, page(i) * MAX_PUT_PAGES))[1] + b"".join(gets))
            unread.append(stream)
        answer = p.get_answer_size(MAX_GET_PAGES)
        kept = cap // answer
        with trio.fail_after(10):  # every one of them blocked on its answers, and all but `kept` closed
            while store.counters[HostCounter.CLOSED_IN_FLIGHT] < len(unread) - kept:
                await trio.sleep(0.01)
        assert inflight.total <= cap
        pager = await start_client(nursery, unix, "pager", npages=1024, token=TOKEN, share=False)
        with trio.fail_after(10):
            await pager.wait_connected()
            data = b"".join(page(i) for i in range(MAX_GET_PAGES))
            assert await pager.put(0, 1, data) == bytes(MAX_GET_PAGES)
            for _ in range(4):
                assert (await pager.get(array("Q", range(MAX_GET_PAGES)))).data == data
        assert pager.counters[LinkCounter.DISCONNECTS] == 0
        assert inflight.total <= cap
        nursery.cancel_scope.cancel()


async def test_a_message_begun_must_be_finished_within_the_frame_timeout(tmp_path, autojump_clock) -> None:
    """A byte now and then does not keep a message open: the deadline is for the rest of
    the frame, counted while the store waits for it.  A put sent in a few slow parts
    that ends in time is served.  (On trio's fake clock: the pauses are exact.)"""
    store = new_store()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN), frame_timeout=1.5,
                                               idle_timeout=60.0)
        stream, conn = await peer(tcp.port, SOURCES[0], say_hello=True, token=TOKEN, name="slow-but-fine")
        data = conn.send_request(Put(0, 1, page(1) + page(2)))[1]
        third = len(data) // 3
        for part in (data[:third], data[third : 2 * third], data[2 * third :]):
            await stream.send_all(part)
            await trio.sleep(0.1)
        answer = await answer_of(stream, conn)
        assert answer.error is None and answer.answer == bytes(2)
        dribbler, conn = await peer(tcp.port, SOURCES[1], say_hello=True, token=TOKEN)
        data = stalled_put(conn, 1)
        await dribbler.send_all(data[:-100])
        start = trio.current_time()
        closed = False
        for b in data[-100:]:
            try:
                await dribbler.send_all(bytes([b]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = True
                break
            with trio.move_on_after(0.2):
                if await dribbler.receive_some(1) == b"":
                    closed = True
                    break
        assert closed or await closed_by_server(dribbler)
        # 1.5 s of waiting for the rest (and the 0.2 s pause that noticed), not 100 bytes' 20 s
        assert 1.5 <= trio.current_time() - start <= 1.5 + 0.2 + 0.05
        assert store.counters[HostCounter.CLOSED_FRAME_TIMEOUT] == 1
        assert set(store.clients) >= {"slow-but-fine"}
        nursery.cancel_scope.cancel()


async def test_a_batch_larger_than_a_wire_put_goes_as_several_and_fails_as_one(tmp_path) -> None:
    store = new_store(capacity=1024)
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store)
        client = await start_client(nursery, unix, "splits", npages=200, share=False)
        data = b"".join(page(i) for i in range(4 * MAX_PUT_PAGES))
        with trio.fail_after(5):
            assert await client.put(0, 1, data[: 3 * MAX_PUT_PAGES * PAGE_SIZE]) == bytes(3 * MAX_PUT_PAGES)
        assert store.counters[HostCounter.PUT_REQUESTS] == 3
        got = await client.get(array("Q", range(3 * MAX_PUT_PAGES)))
        assert got.data == data[: 3 * MAX_PUT_PAGES * PAGE_SIZE]
        # Pages 0..255 of a 200-page device: the last part is refused, so the whole batch fails.
        with pytest.raises(StoreError, match="outside"):
            await client.put(0, 2, data)
        nursery.cancel_scope.cancel()


# -- what the cap must never close: the store's own hand-backs, prompt peers of other pools ------


async def test_a_drain_of_six_clients_closes_none_of_them_for_the_in_flight_cap(tmp_path, backings) -> None:
    """Six pagers of 1024 pages drained at once: four 256-page hand-backs in flight per
    client (24 MiB, past the default cap six times) are the store's own requests, not
    something a peer made it hold.  Every page comes back, no connection is closed."""
    npages = 1024
    async with trio.open_nursery() as nursery:
        address, server = await drain_server(nursery, str(tmp_path / "s"), 6 * npages, drain_timeout=10.0)
        pagers = [await pager_on(nursery, address, f"c{i}", npages, backings) for i in range(6)]
        report = await query(address, Drain(), timeout=FOREVER)
        assert report["handed_back"] == {f"c{i}": npages for i in range(6)}
        assert server.store.counters[HostCounter.CLOSED_IN_FLIGHT] == 0
        for _, pager in pagers:
            await read_back(pager, npages)
        nursery.cancel_scope.cancel()


async def test_hand_back_under_pressure_to_six_clients_closes_none_of_them(tmp_path, backings) -> None:
    npages = 2048
    level = [10.0]
    store = pressured_store(capacity=6 * npages, pressure=level)
    server = Server(store, ServerConfig())
    async with trio.open_nursery() as nursery:
        [address] = await nursery.start(server.serve, [await open_listener(Address("unix", path=str(tmp_path / "s")))])
        pagers = [await pager_on(nursery, address, f"c{i}", npages, backings) for i in range(6)]
        level[0] = 95.0  # past the high watermark: everything goes back
        with trio.fail_after(30):
            while store.pages > 0:
                await trio.sleep(0.05)
        level[0] = 10.0
        assert store.counters[HostCounter.HANDED_BACK_PRESSURE] == 6 * npages
        assert store.counters[HostCounter.CLOSED_IN_FLIGHT] == 0
        for _, pager in pagers:
            await read_back(pager, npages)
        nursery.cancel_scope.cancel()


async def get_flood(port: int, source: str, name: str, stop: trio.Event) -> None:
    """A peer with the token that pipelines the largest gets and reads every answer
    (greedy, not stalled): connects again whenever it is closed."""
    while not stop.is_set():
        try:
            got = await peer(port, source, say_hello=True, token=TOKEN, name=name)
            if got is None:  # refused (its old connection not yet gone): again
                await trio.sleep(0.05)
                continue
            stream, conn = got
            await stream.send_all(conn.send_request(Put(0, 1, page(1) * 64))[1])
            while not stop.is_set():
                gets = [conn.send_request(Get(array("Q", range(MAX_GET_PAGES))))[1] for _ in range(64)]
                await stream.send_all(b"".join(gets))
                while conn.pending > 8:
                    await next_event(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError, p.ProtocolError):
            await trio.sleep(0.05)  # closed (on a loaded machine, one may fall behind the floor): again


async def test_a_crowd_of_greedy_tcp_peers_never_closes_an_admin_pager(tmp_path) -> None:
    """Fifty TCP peers with the token pipelining 256-page gets hold far more than the
    cap in answers; a pager on the unix socket, in the admin pool, has its own budget
    and is never closed for theirs (the floor that keeps a prompt reader open is
    tested on the fake clock below: here, on the real one, a flooder may fall behind)."""
    store = new_store(capacity=65536)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN),
                                               max_connections_per_peer=256)
        pager = await start_client(nursery, unix, "good", npages=4096, token=TOKEN, share=False)
        await pager.wait_connected()
        for i in range(50):
            nursery.start_soon(get_flood, tcp.port, SOURCES[i % len(SOURCES)], f"greedy-{i}", stop)
        with trio.fail_after(20):  # the flood is on: answers held past the TCP pool's cap
            while server.inflight[Pool.TCP].total <= server.config.max_in_flight:
                await trio.sleep(0.01)
        data = b"".join(page(i) for i in range(8))
        with trio.move_on_after(4):
            for n in itertools.count(1):
                first = (n * 8) % 4088
                assert await pager.put(first, n, data) == bytes(8)
                assert (await pager.get(array("Q", range(first, first + 8)))).data == data
        assert pager.counters[LinkCounter.DISCONNECTS] == 0 and pager.counters[LinkCounter.CONNECTS] == 1
        stop.set()
        nursery.cancel_scope.cancel()


async def test_while_a_pool_is_over_its_cap_its_connections_begin_no_new_message(autojump_clock) -> None:
    inflight = InFlight(cap=100, floor=1.0)
    stuck = _Holder(0.0)
    inflight.hold(stuck, 150)
    waited = trio.Event()

    async def reader() -> None:
        await inflight.wait_room()
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(10)
        assert not waited.is_set()  # over the cap: the reader waits
        inflight.hold(stuck, 60)
        with trio.fail_after(1):
            await waited.wait()



# -- a token holder and tokenless peers on the same host ----------------------------------------


async def test_a_tokenless_flood_from_the_same_host_cannot_keep_a_token_holder_out(tmp_path) -> None:
    """Tokenless connections from 127.0.0.9, opened and closed as fast as two threads can,
    spend the rate of its host's connections not past hello many times over: a token
    holder's stats queries from 127.0.0.1, the same host, all get through, its
    connections let in while the hello pool has room and charged to the host's own
    rate only once their hello proved the token."""
    store = new_store()
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, Access(TOKEN))

        stop = threading.Event()

        def flood() -> None:  # in a thread: the store's event loop is the test's
            while not stop.is_set():
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.9", 0))
                        sock.connect(("127.0.0.1", tcp.port))
                    except OSError:
                        pass

        for _ in range(2):
            nursery.start_soon(partial(trio.to_thread.run_sync, flood, abandon_on_cancel=True))
        with trio.fail_after(10):  # the flood has spent its host's rate many times over (a burst of 100)
            while store.counters[HostCounter.CONNECTIONS] + store.counters[HostCounter.REFUSED_CONNECTION_RATE] < 500:
                await trio.sleep(0.01)
        for _ in range(10):
            with trio.fail_after(5):
                assert "pages_stored" in await query(tcp, Stats(), timeout=5.0, token=TOKEN)
        stop.set()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_never_takes_its_hand_backs_is_closed_past_their_budget(tmp_path, backings) -> None:
    """The store's own hand-backs have a budget of their own (here 100 kB): a peer with
    pages that never reads what the store sends holds a hand-back it cannot write, and
    is closed once it has kept the store waiting --shed-after; a pager taking its
    pages back promptly meanwhile is handed all of them and never closed."""
    level = [10.0]
    store = pressured_store(capacity=4096, pressure=level)
    async with trio.open_nursery() as nursery:
        tcp, unix, server = await start_server(nursery, tmp_path, store, max_in_flight=100_000, shed_after=0.2)
        stream, conn = await peer(tcp.port, SOURCES[0], say_hello=True, name="never-reads")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stream.send_all(conn.send_request(Put(0, 1, page(1) * MAX_PUT_PAGES))[1])
        assert (await answer_of(stream, conn)).answer == bytes(MAX_PUT_PAGES)
        _, pager = await pager_on(nursery, unix, "prompt", 1024, backings)
        level[0] = 95.0  # past the high watermark: everything goes back
        with trio.fail_after(30):
            while store.counters[HostCounter.CLOSED_IN_FLIGHT] < 1 or store.clients["prompt"].count:
                await trio.sleep(0.05)
        level[0] = 10.0
        assert store.counters[HostCounter.CLOSED_IN_FLIGHT] == 1
        assert store.counters[HostCounter.HANDED_BACK_PRESSURE] >= 1024
        assert await closed_by_server(stream)
        await read_back(pager, 1024)
        nursery.cancel_scope.cancel()


async def test_a_send_that_the_cap_closes_its_own_connection_for_writes_nothing() -> None:
    """Telling the cap about a write can close the very connection (here every holder
    past the cap goes at once): the send stops there, with PeerGone, not one byte out."""
    ours, theirs = trio.testing.memory_stream_pair()
    endpoint = Endpoint(ours, p.Connection("server"), inflight=InFlight(cap=10))  # floor 0: no peer is prompt enough
    with pytest.raises(PeerGone):
        await endpoint.send(b"x" * 100)
    assert endpoint.closed.is_set()
    with trio.move_on_after(0.1):
        assert await theirs.receive_some(1) == b""  # nothing came (the stream was not even written)
