"""Fuzzing, bounded in time: generated and mutated frames fed to the sans-IO
decoder and to a live session's dispatcher.

Properties: the decoder raises nothing but ProtocolError and never holds more
than one legal frame plus one read; the dispatcher lets nothing but protocol
errors and bad-request answers out of any input (no unexpected exception, no
store inconsistency), each failure closes only its own connection, and a good
client is served afterwards.  VSWAPFS_FUZZ_EXAMPLES sets the effort (default 300).
"""

from __future__ import annotations

import os
from array import array

import msgpack
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagewire import protocol as p
from pagewire.messages import (
    MAX_SEQ,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    ROLE_PAGER,
    Get,
    Hello,
    HelloAnswer,
    Invalidate,
    Put,
    Stats,
    Welcome,
)
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.server import Server, ServerConfig, Session
from hoststore.store import HostCounter, Store

EXAMPLES = int(os.environ.get("VSWAPFS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NPAGES = 64


def hello_frame(name: str = "fuzz") -> bytes:
    conn = p.Connection("client")
    conn.receive_data(p._frame([p.NOTIFICATION, "welcome", Welcome(PROTOCOL_VERSION, "s", "i", b"n" * 16).to_wire()]))
    conn.next_event()
    return conn.send_request(Hello(PROTOCOL_VERSION, name, ROLE_PAGER, NPAGES * PAGE_SIZE, "inst", b"c" * 16))[1]


def legal_frames() -> list[bytes]:
    """Well-formed requests of every kind, to be mutated."""
    msgs = [
        Put(0, 1, bytes(PAGE_SIZE) * 2),
        Put(NPAGES - 1, 7, b"\x01" * PAGE_SIZE),
        Get(array("Q", [0, 1, 5])),
        Invalidate(0, NPAGES, MAX_SEQ),
        Stats(),
    ]
    return [p._frame([p.REQUEST, i, m.method, m.to_wire()]) for i, m in enumerate(msgs)]


LEGAL = legal_frames()
legal = st.integers(0, len(LEGAL) - 1).map(LEGAL.__getitem__)  # by index: short reprs in failure reports

# msgpack values of every shape, for hand-made messages of the right outer form.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=64) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated(draw) -> bytes:
    frame = bytearray(draw(legal))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del frame[at:]
        elif op == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            frame[0:4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    return bytes(frame)


@st.composite
def shaped(draw) -> bytes:
    """A frame with a valid length and msgpack, of a request-ish shape with arbitrary values."""
    method = draw(st.sampled_from(["put", "get", "invalidate", "stats", "drain", "hello", "handback", "x"]))
    obj = [draw(st.sampled_from([0, 0, 0, 1, 2, 7])), draw(values), method, draw(values)]
    return p._frame(obj[: draw(st.integers(1, 4))])


frames = st.lists(st.one_of(st.binary(max_size=128), mutated(), shaped(), legal),
                  min_size=1, max_size=8)


def established_server() -> p.Connection:
    conn = p.Connection("server")
    conn.send_welcome(Welcome(PROTOCOL_VERSION, "s", "i", b"n" * 16))
    conn.receive_data(hello_frame())
    event = conn.next_event()
    conn.accept_hello(event.msgid, HelloAnswer("i", False, b"s" * 32))
    return conn


@FUZZ
@given(frames, st.integers(1, 4096), st.booleans())
def test_decoder_raises_only_protocol_errors_and_stays_bounded(chunks: list[bytes], split: int, hello_first: bool) -> None:
    conn = established_server() if hello_first else p.Connection("server")
    data = b"".join(chunks)
    try:
        for at in range(0, len(data), split):
            conn.receive_data(data[at : at + split])
            while (event := conn.next_event()) is not None:
                assert isinstance(event, p.RequestReceived | p.BadRequest)
                if isinstance(event, p.RequestReceived):
                    assert type(event.message).__name__ in ("Put", "Get", "Invalidate", "Stats", "Drain", "Hello")
            assert conn.buffered <= p.HEADER.size + p.MAX_FRAME + split
    except p.ProtocolError:
        assert conn.closed


def new_store() -> Store:
    return Store(Limits(capacity_pages=128), Sampler(0, source=lambda: Snapshot.fake(10.0)))


async def drive(server: Server, data: bytes, name: str = "fuzz") -> None:
    """One session fed ``data`` after a good hello, until it closes or goes quiet."""
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, server_side).run)
        await client.send_all(hello_frame(name) + data)
        with trio.move_on_after(0.05):
            while await client.receive_some(1 << 20):
                pass
        await client.aclose()


async def good_client_is_served(server: Server) -> None:
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, server_side).run)
        conn = p.Connection("client")
        async def next_event() -> p.Event:
            while (event := conn.next_event()) is None:
                conn.receive_data(await client.receive_some(1 << 20))
            return event

        with trio.fail_after(5):
            assert isinstance(await next_event(), Welcome)
            await client.send_all(conn.send_request(Hello(PROTOCOL_VERSION, "good", ROLE_PAGER, NPAGES * PAGE_SIZE,
                                                          "g", b"g" * 16))[1])
            assert (await next_event()).error is None
            await client.send_all(conn.send_request(Put(3, 1, b"\x07" * PAGE_SIZE))[1])
            assert (await next_event()).answer == bytes(1)
        await client.aclose()


@FUZZ
@given(frames)
def test_dispatcher_survives_any_input_and_keeps_serving(chunks: list[bytes]) -> None:
    store = new_store()
    server = Server(store, ServerConfig(hello_timeout=1.0, idle_timeout=1.0))

    async def main() -> None:
        await drive(server, b"".join(chunks))
        await good_client_is_served(server)

    trio.run(main)
    assert store.counters[HostCounter.CONNECTION_ERRORS] == 0  # nothing but protocol errors and bad requests
    assert store.pages == sum(c.count for c in store.clients.values())
    for client in store.clients.values():
        client.check()
    assert store.clients["good"].count == 1


def test_the_fuzzer_reaches_every_outcome() -> None:
    """The strategies are not vacuous: across examples they produce answered
    requests, bad requests and closed connections."""
    store = new_store()
    server = Server(store, ServerConfig())
    bad_params = p._frame([p.REQUEST, 1, "put", [0, 1, b"short"]])
    garbage = b"\x00\x00\x00\x03\xc1\xc1\xc1"

    async def main() -> None:
        await drive(server, LEGAL[0] + bad_params)
        await drive(server, garbage, name="other")

    trio.run(main)
    assert store.counters[HostCounter.PUT_REQUESTS] >= 1
    assert store.counters[HostCounter.BAD_REQUESTS] >= 1
    assert store.counters[HostCounter.PROTOCOL_ERRORS] >= 1
    assert msgpack.unpackb(bad_params[4:])[2] == "put"
