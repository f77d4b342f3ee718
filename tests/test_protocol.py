"""The sans-IO protocol core, driven between two in-memory endpoints."""

from __future__ import annotations

from array import array

import msgpack
import pytest

from pagewire import protocol as p
from pagewire.messages import (
    MAX_BATCH_PAGES,
    MAX_PUT_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    ROLE_PAGER,
    Get,
    GetAnswer,
    HandBack,
    Hello,
    HelloAnswer,
    Invalidate,
    MessageError,
    PageStatus,
    Put,
    Stats,
    TakeStatus,
    Welcome,
)


def hello(**kw) -> Hello:
    fields = dict(version=PROTOCOL_VERSION, client="t", role=ROLE_PAGER, device_size=64 * PAGE_SIZE,
                  instance="abc", nonce=b"n" * 16)
    fields.update(kw)
    return Hello(**fields)


def feed_all(conn: p.Connection, data: bytes) -> list[p.Event]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return p.HEADER.pack(len(body)) + body


def handshake() -> tuple[p.Connection, p.Connection]:
    client, server = p.Connection("client"), p.Connection("server")
    [welcome] = feed_all(client, server.send_welcome(Welcome(PROTOCOL_VERSION, "s", "inst", b"w" * 16)))
    assert isinstance(welcome, Welcome) and client.welcome == welcome
    msgid, data = client.send_request(hello())
    [req] = feed_all(server, data)
    assert isinstance(req, p.RequestReceived) and req.message == hello()
    [resp] = feed_all(client, server.accept_hello(req.msgid, HelloAnswer("inst", False, b"s" * 32)))
    assert isinstance(resp, p.Response) and resp.msgid == msgid and resp.error is None
    assert resp.answer.secret == b"s" * 32
    assert client.established and server.established
    return client, server


def answer(server: p.Connection, client: p.Connection, wire: bytes, result) -> p.Response:
    [req] = feed_all(server, wire)
    [resp] = feed_all(client, server.send_answer(req.msgid, req.message, result))
    return resp


def test_batched_put_roundtrip_with_typed_answer() -> None:
    client, server = handshake()
    data = bytes(range(256)) * 16 * 64  # 64 pages
    msgid, wire = client.send_request(Put(10, 1, data))
    [req] = feed_all(server, wire)
    assert req.message == Put(10, 1, data) and req.message.n == 64
    statuses = bytes([PageStatus.STORED] * 63 + [PageStatus.REFUSED_CAPACITY])
    [resp] = feed_all(client, server.send_answer(req.msgid, req.message, statuses))
    assert resp.msgid == msgid and resp.answer == statuses and resp.request == Put(10, 1, data)
    assert client.pending == 0


def test_get_answer_carries_versions() -> None:
    client, server = handshake()
    _, wire = client.send_request(Get(array("Q", [3, 1])))
    ans = GetAnswer(bytes([PageStatus.STORED, PageStatus.MISSING]), array("Q", [7, 0]), bytes(2 * PAGE_SIZE))
    resp = answer(server, client, wire, ans)
    assert list(resp.answer.seqs) == [7, 0] and resp.answer.statuses == ans.statuses


def test_handback_goes_from_server_to_client() -> None:
    client, server = handshake()
    hb = HandBack("drain", array("Q", [5, 9]), array("Q", [2, 3]), bytes(2 * PAGE_SIZE))
    _, wire = server.send_request(hb)
    [req] = feed_all(client, wire)
    assert isinstance(req, p.RequestReceived) and req.message == hb
    [resp] = feed_all(server, client.send_answer(req.msgid, hb, bytes([TakeStatus.TAKEN, TakeStatus.FAILED])))
    assert resp.answer == bytes([TakeStatus.TAKEN, TakeStatus.FAILED])


@pytest.mark.parametrize("bad", [
    lambda: Put(0, 0, bytes(PAGE_SIZE)),  # seq 0 is never a version
    lambda: Put(0, 1, bytes(100)),  # not whole pages
    lambda: Put(0, 1, b""),  # empty
    lambda: Put(0, 1, bytes((MAX_BATCH_PAGES + 1) * PAGE_SIZE)),
    lambda: Put(-1, 1, bytes(PAGE_SIZE)),
    lambda: Put(True, 1, bytes(PAGE_SIZE)),  # a bool is not a page number
    lambda: Get(array("Q")),
    lambda: Get(array("Q", range(MAX_BATCH_PAGES + 1))),
    lambda: Invalidate(0, 0, 1),
    lambda: HandBack("whim", array("Q", [1]), array("Q", [1]), bytes(PAGE_SIZE)),
    lambda: HandBack("drain", array("Q", [1]), array("Q", [1, 2]), bytes(PAGE_SIZE)),
    lambda: hello(role="god"),
    lambda: hello(device_size=4097),
    lambda: hello(client=""),
    lambda: hello(client="a\nb"),
    lambda: hello(nonce=b"short"),
])
def test_messages_validate_themselves(bad) -> None:
    with pytest.raises(MessageError):
        bad()


def test_answers_are_checked_against_their_request() -> None:
    client, server = handshake()
    _, wire = client.send_request(Put(0, 1, bytes(2 * PAGE_SIZE)))
    [req] = feed_all(server, wire)
    with pytest.raises(p.ProtocolError, match="2 status bytes"):
        feed_all(client, frame([p.RESPONSE, req.msgid, None, bytes(3)]))
    assert client.closed


def test_unknown_status_in_an_answer_closes() -> None:
    client, server = handshake()
    _, wire = client.send_request(Put(0, 1, bytes(PAGE_SIZE)))
    [req] = feed_all(server, wire)
    with pytest.raises(p.ProtocolError, match="unknown status"):
        feed_all(client, frame([p.RESPONSE, req.msgid, None, bytes([200])]))


def test_bad_params_are_an_error_answer_not_a_close() -> None:
    client, server = handshake()
    [event] = feed_all(server, frame([p.REQUEST, 7, "put", [0, 1, b"x" * 10]]))
    assert isinstance(event, p.BadRequest) and event.msgid == 7 and "whole pages" in event.reason
    [event] = feed_all(server, frame([p.REQUEST, 8, "frobnicate", []]))
    assert isinstance(event, p.BadRequest) and "unknown method" in event.reason
    # A client may not send what only a server sends.
    [event] = feed_all(server, frame([p.REQUEST, 9, "handback", ["drain", b"", b"", b""]]))
    assert isinstance(event, p.BadRequest)
    assert not server.closed and server.established


def test_pipelined_requests_answered_out_of_order() -> None:
    client, server = handshake()
    ids, wire = [], b""
    for i in range(5):
        msgid, data = client.send_request(Invalidate(i, 1, i + 1))
        ids.append(msgid)
        wire += data
    requests = feed_all(server, wire)
    assert [r.msgid for r in requests] == ids and client.pending == 5
    answers = b"".join(server.send_answer(r.msgid, r.message, 1) for r in reversed(requests))
    responses = feed_all(client, answers)
    assert [r.msgid for r in responses] == list(reversed(ids))
    assert all(r.answer == 1 for r in responses) and client.pending == 0


def test_bytes_may_arrive_one_at_a_time() -> None:
    client, server = handshake()
    _, wire = client.send_request(Put(3, 9, bytes(range(256)) * 16))
    events = []
    for i in range(len(wire)):
        server.receive_data(wire[i : i + 1])
        if (event := server.next_event()) is not None:
            events.append(event)
    assert len(events) == 1 and events[0].message.first == 3 and server.buffered == 0


def test_msgid_wraps_around_and_skips_ids_in_use() -> None:
    client, server = handshake()
    client._next_msgid = p.MSGID_MODULUS - 2
    ids = [client.send_request(Stats())[0] for _ in range(3)]
    assert ids == [p.MSGID_MODULUS - 2, p.MSGID_MODULUS - 1, 0]
    client._next_msgid = p.MSGID_MODULUS - 1  # still pending: the next free id is used
    assert client.send_request(Stats())[0] == 1


def test_no_request_before_hello_and_hello_only_once() -> None:
    client = p.Connection("client")
    with pytest.raises(p.ProtocolError):
        client.send_request(Put(0, 1, bytes(PAGE_SIZE)))
    server = p.Connection("server")
    with pytest.raises(p.ProtocolError, match="hello"):
        feed_all(server, frame([p.REQUEST, 1, "put", [0, 1, bytes(100)]]))
    assert server.closed
    _, server = handshake()
    with pytest.raises(p.ProtocolError, match="twice"):
        feed_all(server, frame([p.REQUEST, 5, "hello", hello().to_wire()]))


def test_client_needs_the_welcome_first() -> None:
    client = p.Connection("client")
    with pytest.raises(p.ProtocolError):
        client.send_request(hello())
    with pytest.raises(p.ProtocolError, match="welcome"):
        feed_all(client, frame([p.RESPONSE, 0, None, {}]))


def test_refused_hello_closes_both_ends() -> None:
    client, server = p.Connection("client"), p.Connection("server")
    feed_all(client, server.send_welcome(Welcome(PROTOCOL_VERSION, "s", "i", b"w" * 16)))
    _, data = client.send_request(hello())
    [req] = feed_all(server, data)
    [resp] = feed_all(client, server.refuse_hello(req.msgid, "in use"))
    assert resp.error == "in use" and not client.established and client.closed and server.closed


def test_wrong_version_hello_is_a_bad_request_with_the_reason() -> None:
    server = p.Connection("server")
    [event] = feed_all(server, frame([p.REQUEST, 0, "hello", {"version": 1}]))
    assert isinstance(event, p.BadRequest) and "version 1 not supported" in event.reason


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({"not": "an array"}),
        msgpack.packb([7, 1, "x", []]),
        msgpack.packb([0, -1, "stats", {}]),
        msgpack.packb([0, 1 << 32, "stats", {}]),
        msgpack.packb([0, True, "stats", {}]),
        msgpack.packb([0, 1, 5, {}]),
        msgpack.packb([1, 999, None, None]),  # an answer to nothing we asked
        msgpack.packb([2, "gossip", {}]),  # no such notification
        b"\xc1",  # never valid msgpack
        msgpack.packb([0, 1, "stats", {}]) + b"\x00",  # trailing bytes inside the frame
        msgpack.packb([0, 1, "get", [list(range(p.MAX_BATCH_PAGES + 20))]]),
    ],
)
def test_malformed_frames_close_the_connection(body: bytes) -> None:
    _, server = handshake()
    with pytest.raises(p.ProtocolError):
        feed_all(server, p.HEADER.pack(len(body)) + body)
    assert server.closed and server.next_event() is None
    with pytest.raises(p.ProtocolError):
        server.send_error(1, "x")


def test_oversized_length_is_refused_at_the_header() -> None:
    _, server = handshake()
    server.receive_data(p.HEADER.pack(0x7FFFFFFF))  # 2 GiB announced, nothing more sent
    with pytest.raises(p.ProtocolError, match="larger than any message"):
        server.next_event()
    assert server.buffered == 0 or server.closed


def test_before_hello_only_small_frames() -> None:
    server = p.Connection("server")
    server.receive_data(p.HEADER.pack(p.MAX_HANDSHAKE_FRAME + 1))
    with pytest.raises(p.ProtocolError):
        server.next_event()


def test_a_full_put_fits_behind_a_partial_message() -> None:
    """A put of the most pages the wire takes, arriving behind part of another, is accepted."""
    client, server = handshake()
    _, first = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    _, second = client.send_request(Put(0, 2, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    assert len(first) <= p.MAX_REQUEST_FRAME + p.HEADER.size
    events = feed_all(server, first[:-10])
    events += feed_all(server, first[-10:] + second)
    assert [e.message.seq for e in events] == [1, 2]


def test_a_store_holds_at_most_one_put_of_the_wire_size_and_a_client_takes_full_hand_backs() -> None:
    """What a peer can make a store hold is one frame of MAX_PUT_PAGES: a put of one
    page more is refused at its header, before its data is buffered, and a reader
    that takes ``room`` bytes at a time never holds more.  A client still takes a
    hand-back of a whole batch from its store."""
    client, server = handshake()
    _, too_big = client.send_request(Put(0, 1, bytes((MAX_PUT_PAGES + 1) * PAGE_SIZE)))
    _, legal = client.send_request(Put(0, 2, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    assert server.room == p.HEADER.size + p.MAX_REQUEST_FRAME
    server.receive_data(legal[: len(legal) // 2])
    assert server.next_event() is None
    assert server.buffered + server.room == p.HEADER.size + p.MAX_REQUEST_FRAME
    server.receive_data(legal[len(legal) // 2 :] + too_big[:4096])
    assert server.next_event().message.seq == 2
    with pytest.raises(p.FrameTooLarge):
        server.next_event()
    assert server.closed
    pages = array("Q", range(MAX_BATCH_PAGES))
    hb = HandBack("drain", pages, array("Q", [1] * MAX_BATCH_PAGES), bytes(MAX_BATCH_PAGES * PAGE_SIZE))
    client, server = handshake()
    _, wire = server.send_request(hb)
    [req] = feed_all(client, wire)
    assert req.message.pages == pages


def test_a_frame_taken_whole_leaves_no_buffer_behind() -> None:
    """Once every byte received is an event, the receive buffer is let go: a peer that
    sent one large put and went quiet holds nothing in the store."""
    client, server = handshake()
    _, data = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    [event] = feed_all(server, data)
    assert event.message.n == MAX_PUT_PAGES
    assert len(server._inbox) == 0 and server.buffered == 0


def test_a_get_answer_built_in_place_decodes_as_the_packed_one() -> None:
    """The server fills get answers in their frame; the client must read them exactly
    as it reads the generically packed ones."""
    from pagewire.messages import GetAnswer

    for n in (1, 7, 255, 256):
        client, server = handshake()
        msgid, data = client.send_request(Get(array("Q", range(n))))
        server.receive_data(data)
        event = server.next_event()
        frame = p.get_answer_frame(event.msgid, n)
        assert frame is not None
        statuses = bytes(i % 2 * PageStatus.MISSING for i in range(n))
        seqs = array("Q", [0 if i % 2 else i + 5 for i in range(n)])
        pages = b"".join((bytes(PAGE_SIZE) if i % 2 else i.to_bytes(2, "little") * (PAGE_SIZE // 2)) for i in range(n))
        frame.statuses[:] = statuses
        frame.seqs[:] = seqs
        frame.data[:] = pages
        packed = server.send_answer(event.msgid, event.message, GetAnswer(statuses, seqs, pages))
        for wire in (bytes(server.send_get_answer(frame)), packed):
            client2, _ = handshake()
            mid, _ = client2.send_request(Get(array("Q", range(n))))
            assert mid == msgid
            client2.receive_data(wire)
            answer = client2.next_event().answer
            assert (answer.statuses, list(answer.seqs), bytes(answer.data)) == (statuses, list(seqs), pages)


def test_a_client_takes_an_admins_stats_of_a_thousand_clients() -> None:
    """A store's stats name every client (up to --max-clients, 1024 by default): found
    by `vswapctl attack`, whose observer could not read the stats once more than 256
    names had come and gone."""
    client, server = handshake()
    msgid, data = client.send_request(Stats())
    [req] = feed_all(server, data)
    clients = {f"vm{i}": {"pages": i} for i in range(1024)}
    [resp] = feed_all(client, server.send_answer(req.msgid, req.message, {"clients": clients}))
    assert resp.msgid == msgid and resp.answer["clients"] == clients


def test_a_closed_connection_lets_its_buffer_go_at_once() -> None:
    """Found by `vswapctl attack`: a session closed from outside (the in-flight cap) is
    freed only when the garbage collector gets to it (it and its endpoint refer to each
    other), so its half-received frame must not wait for that."""
    client, server = handshake()
    _, data = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    server.receive_data(data[:-1])
    assert server.next_event() is None and server.buffered == len(data) - 1
    server.close()
    assert len(server._inbox) == 0 and server.buffered == 0


def test_the_rest_of_a_large_frame_is_read_into_one_buffer_made_for_it() -> None:
    """Found measuring `vswapctl attack`: a put arriving in many reads regrew the receive
    buffer read by read (and each read was a buffer of its own), and a crowd of such
    peers left the store's heap several MiB larger.  Once the length is known, the
    buffer is made at the frame's size, once, and later reads go straight into it."""
    client, server = handshake()
    _, data = client.send_request(Put(0, 7, bytes(range(256)) * (MAX_PUT_PAGES * PAGE_SIZE // 256)))
    server.receive_data(data[:1000])
    buffer = server._inbox
    assert server.reserved == len(data) and server.frame_rest == len(data) - 1000
    at = 1000
    while at < len(data):
        with server.receive_buffer(4096) as view:
            n = len(view)
            view[:] = data[at : at + n]
        server.received(n)
        at += n
        assert server._inbox is buffer
    event = server.next_event()
    assert event.message.seq == 7 and bytes(event.message.data) == data[-MAX_PUT_PAGES * PAGE_SIZE :]
    assert server.reserved == 0  # taken whole: let go


def test_a_peer_that_sent_only_a_length_is_counted_for_the_frame_it_announced() -> None:
    """The store makes room for a whole frame once its length is read, so that room is
    what the peer holds (``reserved``, what the in-flight cap counts), not the four
    bytes sent; a length above the limit gets no room, only the refusal."""
    client, server = handshake()
    _, data = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    server.receive_data(data[: p.HEADER.size])
    assert server.next_event() is None
    assert server.buffered == p.HEADER.size and server.reserved == len(data)
    client, server = handshake()
    server.receive_data(p.HEADER.pack(p.MAX_REQUEST_FRAME + 1))
    assert server.frame_rest == 0 and server.reserved == p.HEADER.size
    with pytest.raises(p.FrameTooLarge):
        server.next_event()


def test_a_client_keeps_its_buffer_and_reads_small_messages_after_large_ones_into_it() -> None:
    """A client's buffer stays for the next answer; what is left of a read moves to its
    start when the end has no room, without a new buffer."""
    client, server = handshake()
    wires = []
    for seq in (1, 2, 3):
        msgid, _ = client.send_request(Get(array("Q", range(64))))
        answer = GetAnswer(bytes(64), array("Q", [seq] * 64), bytes([seq]) * (64 * PAGE_SIZE))
        wires.append(server.send_answer(msgid, Get(array("Q", range(64))), answer))
    client.receive_data(wires[0] + wires[1][:100])
    assert client.next_event().answer.seqs[0] == 1
    client.receive_data(wires[1][100:] + wires[2])
    assert [client.next_event().answer.seqs[0] for _ in range(2)] == [2, 3]
    assert client.buffered == 0
    small = server.send_answer(client.send_request(Stats())[0], Stats(), {"clients": {}})
    kept = client._inbox
    client.receive_data(small)
    assert client._inbox is kept and client.next_event().answer == {"clients": {}}


@pytest.mark.parametrize("message", [
    Put(3, 9, bytes(range(256)) * (MAX_PUT_PAGES * PAGE_SIZE // 256)),
    Put(3, 9, b"x" * (p.SPLICE_BYTES - PAGE_SIZE)),  # below the splice: packed as before
    HandBack("pressure", array("Q", range(256)), array("Q", [5] * 256), b"\x07" * (256 * PAGE_SIZE)),
])
def test_large_page_data_is_framed_around_and_read_back_as_packed(message) -> None:
    """A message ending in large page data is framed in one buffer, the data copied
    once; the peer reads it exactly as msgpack packs it."""
    client, server = handshake()
    sender, receiver = (client, server) if message.sent_by == "client" else (server, client)
    msgid, wire = sender.send_request(message)
    body = msgpack.packb([p.REQUEST, msgid, message.method, message.to_wire()], use_bin_type=True)
    assert bytes(wire) == p.HEADER.pack(len(body)) + body  # bin 32 is msgpack's own choice past 64 KiB
    [event] = feed_all(receiver, wire)
    assert event.message == message


def test_page_data_in_wider_items_is_framed_and_received_by_its_bytes() -> None:
    """Found by review: a view of 8-byte items has a len() of an eighth of its bytes; the
    frame's length prefix must count bytes (or the rest of the data would be read as
    the next frames, whose contents the page data's owner chooses)."""
    data = bytes(range(256)) * (MAX_PUT_PAGES * PAGE_SIZE // 256)
    wide = memoryview(data).cast("Q")
    wire = p._frame([p.REQUEST, 0, "put", [0, 1, wide]])
    assert bytes(wire) == p._frame([p.REQUEST, 0, "put", [0, 1, data]])
    client, server = handshake()
    _, wire = client.send_request(Put(0, 1, data))
    server.receive_data(memoryview(bytes(wire)[: len(wire) // 8 * 8]).cast("Q"))
    server.receive_data(bytes(wire)[len(wire) // 8 * 8 :])
    assert bytes(server.next_event().message.data) == data


def test_a_length_right_after_a_whole_frame_is_counted_for_its_frame() -> None:
    """Found by review: a read that ends one frame and brings the next one's length made
    no room for that frame until the next read, so the in-flight cap, told what the
    connection holds between the two, counted the few bytes and not the frame."""
    client, server = handshake()
    _, small = client.send_request(Stats())
    _, big = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    server.receive_data(small + big[: p.HEADER.size])
    assert isinstance(server.next_event().message, Stats)
    assert server.buffered == p.HEADER.size and server.reserved == len(big)


def test_bytes_read_into_a_closed_connection_are_refused() -> None:
    """A connection closed while a read was writing into its buffer takes nothing more
    (the endpoint checks first; this end refuses all the same)."""
    client, server = handshake()
    _, data = client.send_request(Put(0, 1, bytes(MAX_PUT_PAGES * PAGE_SIZE)))
    server.receive_data(data[:100])
    with server.receive_buffer(1 << 20) as view:
        view[:50] = data[100:150]
    server.close()
    with pytest.raises(p.ProtocolError):
        server.received(50)
    assert server.reserved == 0 and server.buffered == 0


def test_a_client_lets_a_buffer_larger_than_it_keeps_go() -> None:
    """A hand-back of a whole batch (4 MiB) is read into a buffer its size; the client
    keeps buffers for answers (up to CLIENT_KEEP_BYTES), not that one."""
    client, server = handshake()
    pages = array("Q", range(MAX_BATCH_PAGES))
    hb = HandBack("drain", pages, array("Q", [1] * MAX_BATCH_PAGES), bytes(MAX_BATCH_PAGES * PAGE_SIZE))
    _, wire = server.send_request(hb)
    [event] = feed_all(client, wire)
    assert event.message.pages == pages and client.reserved == 0
    msgid, _ = client.send_request(Get(array("Q", range(64))))
    answer = GetAnswer(bytes(64), array("Q", [1] * 64), bytes(64 * PAGE_SIZE))
    [event] = feed_all(client, server.send_answer(msgid, Get(array("Q", range(64))), answer))
    assert 64 * PAGE_SIZE < client.reserved <= p.CLIENT_KEEP_BYTES
