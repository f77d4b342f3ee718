"""The sans-IO protocol core, driven between two in-memory endpoints."""

from __future__ import annotations

import msgpack
import pytest

from hoststore import protocol as p


def hello_params() -> dict:
    return {"version": p.PROTOCOL_VERSION, "client": "t", "role": p.ROLE_PAGER, "device_size": 8192, "session": "s"}


def feed_all(conn: p.Connection, data: bytes) -> list[p.Event]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def handshake() -> tuple[p.Connection, p.Connection]:
    client, server = p.Connection("client"), p.Connection("server")
    msgid, data = client.send_request(p.HELLO, hello_params())
    [req] = feed_all(server, data)
    assert isinstance(req, p.Request) and req.method == p.HELLO and req.params == hello_params()
    [resp] = feed_all(client, server.accept_hello(req.msgid, {"version": p.PROTOCOL_VERSION}))
    assert isinstance(resp, p.Response) and resp.msgid == msgid and resp.error is None
    assert client.established and server.established
    return client, server


def test_handshake_then_batched_put_roundtrip() -> None:
    client, server = handshake()
    data = bytes(range(256)) * 16 * 64  # 64 pages
    msgid, wire = client.send_request(p.PUT, [10, 1, data])
    [req] = feed_all(server, wire)
    assert req.method == p.PUT and req.params == [10, 1, data]
    answer = bytes([p.PageStatus.STORED] * 63 + [p.PageStatus.REFUSED_CAPACITY])
    [resp] = feed_all(client, server.send_response(req.msgid, None, answer))
    assert resp.msgid == msgid and p.statuses(resp.result)[-1] == p.PageStatus.REFUSED_CAPACITY
    assert client.pending == 0


def test_split_at_every_byte_boundary() -> None:
    client, server = handshake()
    wires = [client.send_request(p.PUT, [i, i + 1, bytes([i]) * p.PAGE_SIZE])[1] for i in range(3)]
    stream = b"".join(wires)
    for cut in range(len(stream) + 1):
        fresh_client, fresh_server = handshake()
        wires2 = [fresh_client.send_request(p.PUT, [i, i + 1, bytes([i]) * p.PAGE_SIZE])[1] for i in range(3)]
        assert b"".join(wires2) == stream
        events = feed_all(fresh_server, stream[:cut]) + feed_all(fresh_server, stream[cut:])
        assert [e.params[0] for e in events] == [0, 1, 2]
        assert all(e.params[2] == bytes([e.params[0]]) * p.PAGE_SIZE for e in events)


def test_byte_at_a_time() -> None:
    client, server = handshake()
    _, wire = client.send_request(p.GET, [[1, 2, 3]])
    events = []
    for i in range(len(wire)):
        events += feed_all(server, wire[i : i + 1])
    assert len(events) == 1 and events[0].params == [[1, 2, 3]]


def test_pipelined_answers_out_of_order() -> None:
    client, server = handshake()
    ids = [client.send_request(p.GET, [[i]])[0] for i in range(5)]
    requests = feed_all(server, b"")  # nothing fed yet
    assert requests == [] and client.pending == 5
    answers = b"".join(server.send_response(m, None, m) for m in reversed(ids))
    responses = feed_all(client, answers)
    assert [r.msgid for r in responses] == list(reversed(ids))
    assert client.pending == 0


def test_msgid_wraps_around() -> None:
    client, server = handshake()
    client._next_msgid = p.MSGID_MODULUS - 2
    ids = [client.send_request(p.STATS, {})[0] for _ in range(3)]
    assert ids == [p.MSGID_MODULUS - 2, p.MSGID_MODULUS - 1, 0]
    for m in ids:
        [resp] = feed_all(client, server.send_response(m, None, {}))
        assert resp.msgid == m


def test_wrapped_msgid_still_pending_is_an_error() -> None:
    client, _ = handshake()
    pending_id, _ = client.send_request(p.STATS, {})
    client._next_msgid = pending_id
    with pytest.raises(p.ProtocolError):
        client.send_request(p.STATS, {})


def test_server_requests_reach_the_client() -> None:
    client, server = handshake()
    server_msgid, wire = server.send_request("reclaim", [5])
    [req] = feed_all(client, wire)
    assert isinstance(req, p.Request) and req.method == "reclaim"
    [resp] = feed_all(server, client.send_response(req.msgid, None, 5))
    assert resp.msgid == server_msgid and resp.result == 5


def test_no_request_before_hello() -> None:
    client = p.Connection("client")
    with pytest.raises(p.ProtocolError):
        client.send_request(p.PUT, [0, 1, b""])
    server = p.Connection("server")
    with pytest.raises(p.ProtocolError, match="hello"):
        feed_all(server, msgpack.packb([0, 1, p.PUT, [0, 1, b""]]))
    assert server.closed


def test_refused_hello_leaves_client_not_established() -> None:
    client, server = p.Connection("client"), p.Connection("server")
    _, data = client.send_request(p.HELLO, hello_params())
    [req] = feed_all(server, data)
    [resp] = feed_all(client, server.refuse_hello(req.msgid, "version"))
    assert resp.error == "version" and not client.established and server.closed


@pytest.mark.parametrize(
    "wire",
    [
        msgpack.packb({"not": "an array"}),
        msgpack.packb([7, 1, "x", []]),
        msgpack.packb([0, -1, "stats", {}]),
        msgpack.packb([0, 1 << 32, "stats", {}]),
        msgpack.packb([0, 1, 5, {}]),
        msgpack.packb([1, 999, None, None]),  # answer to nothing we asked
        msgpack.packb([2, "only-two"])[:-1] + b"\xc1",  # 0xc1 is never valid msgpack
        msgpack.packb([0, 1, "put", [0, 1, b"x" * (p.MAX_BIN_LEN + 1)]]),
        msgpack.packb([0, 1, "get", [list(range(p.MAX_ARRAY_LEN + 1))]]),
    ],
)
def test_malformed_input_closes_the_connection(wire: bytes) -> None:
    _, server = handshake()
    with pytest.raises(p.ProtocolError):
        feed_all(server, wire)
    assert server.closed
    with pytest.raises(p.ProtocolError):
        server.send_response(1, None, None)


def test_oversized_buffer_is_refused() -> None:
    _, server = handshake()
    with pytest.raises(p.ProtocolError):
        for _ in range(p.MAX_BUFFER_SIZE // 65536 + 2):
            server.receive_data(b"\xc6\x7f\xff\xff\xff" if _ == 0 else b"\0" * 65536)
            server.next_event()
    assert server.closed
