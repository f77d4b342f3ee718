"""Sans-IO core of the vswapfs <-> hoststore protocol, shared by both sides.

Nothing here touches a socket or trio (as in h11): bytes go in through
:meth:`Connection.receive_data` and come out as events from
:meth:`Connection.next_event`; messages (``pagewire.messages``) go in through
``send_*`` and come out as bytes for the caller to write.  Either end may send
requests: the store asks its clients to take pages back.

Framing: each message is a 4-byte big-endian length followed by one msgpack
value, a msgpack-RPC shape:

* request       ``[0, msgid, method, params]``
* response      ``[1, msgid, error, result]``
* notification  ``[2, method, params]``

The length comes first so that a frame larger than any legal message is
refused at its header, before a byte of it is buffered; the buffer therefore
never holds more than one legal message plus one read (:attr:`Connection.room`
lets the reader stop at one legal message).  What is legal depends on the
direction: a store takes requests, the largest a put of ``MAX_PUT_PAGES``
(:data:`MAX_REQUEST_FRAME`); a client takes answers and hand-backs of up to
``MAX_BATCH_PAGES`` (:data:`MAX_FRAME`).

The server speaks first, a ``welcome`` notification with a nonce; the
client's first request is ``hello``, and nothing else is accepted (or may be
sent) until the server has answered it.  A frame that breaks these rules
closes the connection (:class:`ProtocolError`); a well-framed request with bad
parameters is answered with an error and the connection goes on
(:class:`BadRequest`).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from .messages import (  # noqa: F401  (re-exported: the protocol's vocabulary)
    MAX_BATCH_PAGES,
    MAX_GET_PAGES,
    MAX_PUT_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    REQUESTS,
    Hello,
    HelloAnswer,
    MessageError,
    PageStatus,
    Request,
    Welcome,
)

MSGID_MODULUS = 1 << 32
REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

HEADER = struct.Struct(">I")
# The largest frame a client takes: a batch of pages plus its page and sequence
# lists (a hand-back from its store).
MAX_FRAME = MAX_BATCH_PAGES * (PAGE_SIZE + 16) + 4096
# The largest frame a store takes: a put of MAX_PUT_PAGES and its fields (every
# other request is far smaller).  This is what one connection can make a store hold.
MAX_REQUEST_FRAME = MAX_PUT_PAGES * PAGE_SIZE + 4096
# Until the hello is answered, frames are small: an unauthenticated peer cannot
# make this end buffer a page batch.
MAX_HANDSHAKE_FRAME = 4096
# A client keeps a receive buffer this large between answers (a get's largest, and
# then some); a larger one (a hand-back's) is let go once it is read.
CLIENT_KEEP_BYTES = 2 << 20
# How many requests may wait for answers; a peer that answers none of them is broken.
MAX_PENDING = 1 << 16

# What a store takes apart: requests, whose lists and maps are small.
_REQUEST_LIMITS = dict(
    raw=False,
    use_list=True,
    max_bin_len=MAX_FRAME,
    max_str_len=64 * 1024,
    max_array_len=MAX_BATCH_PAGES + 16,
    max_map_len=256,
    max_ext_len=0,
    strict_map_key=True,
)
# What a client takes apart: answers, among them an admin's stats with a map entry
# per client of the store (--max-clients, 1024 by default), bounded by MAX_FRAME.
_ANSWER_LIMITS = dict(_REQUEST_LIMITS, max_array_len=1 << 16, max_map_len=1 << 16)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    """A length prefix above any legal message: refused before a byte of it is buffered."""


@dataclass(frozen=True, slots=True)
class RequestReceived:
    msgid: int
    message: Request


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A well-framed request this end cannot accept: answer ``reason`` as the error."""

    msgid: int
    method: str
    reason: str


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to one of our requests: ``answer`` (typed, validated) or ``error``."""

    msgid: int
    request: Request
    answer: Any
    error: str | None


Event = Welcome | RequestReceived | BadRequest | Response

_AWAIT_WELCOME, _AWAIT_HELLO, _HELLO_PENDING, _ESTABLISHED, _CLOSED = range(5)


class Connection:
    """One end of a connection.  ``role`` is "client" or "server"."""

    def __init__(self, role: str) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self._state = _AWAIT_WELCOME if role == "client" else _AWAIT_HELLO
        self._welcomed = False
        self._inbox = bytearray()  # received bytes are _inbox[_pos:_end]; beyond _end, room to read into
        self._pos = 0
        self._end = 0
        self._next_msgid = 0
        self._pending: dict[int, Request] = {}
        self._hello_msgid: int | None = None
        self.welcome: Welcome | None = None  # client: what the server said first

    # -- state ----------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._state == _ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def pending(self) -> int:
        """Requests sent that have not been answered yet."""
        return len(self._pending)

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return self._end - self._pos

    @property
    def frame_limit(self) -> int:
        """The largest frame this end takes now (a longer length prefix is FrameTooLarge)."""
        if self._state != _ESTABLISHED:
            return MAX_HANDSHAKE_FRAME
        return MAX_REQUEST_FRAME if self.role == "server" else MAX_FRAME

    @property
    def room(self) -> int:
        """How many bytes a reader may take in now: never more than one frame of the
        largest size allowed is held (a complete frame is taken out as an event
        before more is read, so what is held is the start of one)."""
        return max(1, HEADER.size + self.frame_limit - self.buffered)

    def close(self) -> None:
        """Closed for good: what was received and not yet taken is let go at once (not
        when the garbage collector gets to whatever still refers to this connection)."""
        self._state = _CLOSED
        self._inbox = bytearray()
        self._pos = self._end = 0

    # -- outgoing -------------------------------------------------------------------

    def send_welcome(self, welcome: Welcome) -> bytes:
        """Server: the first bytes on a new connection."""
        self._check_open()
        if self.role != "server" or self._welcomed:
            raise ProtocolError("only a server sends the welcome, once")
        self._welcomed = True
        return _frame([NOTIFICATION, Welcome.method, welcome.to_wire()])

    def send_request(self, message: Request) -> tuple[int, bytes]:
        """Frame a request; returns its msgid and the bytes to write."""
        self._check_open()
        if message.sent_by != self.role:
            raise ProtocolError(f"a {self.role} does not send {message.method!r}")
        if isinstance(message, Hello):
            if self._state != _AWAIT_HELLO:
                raise ProtocolError("hello is sent once, after the welcome")
            self._state = _HELLO_PENDING
        elif self._state != _ESTABLISHED:
            raise ProtocolError(f"{message.method!r} before the hello was answered")
        if len(self._pending) >= MAX_PENDING:
            raise ProtocolError(f"{len(self._pending)} requests unanswered: the peer is not answering")
        msgid = self._next_msgid
        while msgid in self._pending:  # a wrapped counter skips ids still in use
            msgid = (msgid + 1) % MSGID_MODULUS
        self._next_msgid = (msgid + 1) % MSGID_MODULUS
        self._pending[msgid] = message
        if isinstance(message, Hello):
            self._hello_msgid = msgid
        return msgid, _frame([REQUEST, msgid, message.method, message.to_wire()])

    def send_answer(self, msgid: int, message: Request, answer: Any) -> bytes:
        """Answer a received request with its typed answer."""
        self._check_open()
        return _frame([RESPONSE, msgid, None, message.answer_to_wire(answer)])

    def send_get_answer(self, frame: "GetAnswerFrame") -> bytearray | mmap.mmap | memoryview:
        """A get answer built in place (:func:`get_answer_frame`), once it is filled."""
        self._check_open()
        return frame.frame

    def send_error(self, msgid: int, error: str) -> bytes:
        self._check_open()
        return _frame([RESPONSE, msgid, str(error)[:1024], None])

    def accept_hello(self, msgid: int, answer: HelloAnswer) -> bytes:
        """Server: answer the hello and open the connection for requests."""
        if self.role != "server" or self._state != _HELLO_PENDING or self._hello_msgid != msgid:
            raise ProtocolError("accept_hello without a pending hello")
        self._state = _ESTABLISHED
        return _frame([RESPONSE, msgid, None, answer.to_wire()])

    def refuse_hello(self, msgid: int, error: str) -> bytes:
        """Server: answer the hello with an error; the caller then closes."""
        data = self.send_error(msgid, error)
        self._state = _CLOSED
        return data

    # -- incoming -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the transport."""
        self._check_open()
        data = memoryview(data).cast("B")  # counted in bytes, whatever its items are
        n = len(data)
        self._reserve(n)
        self._inbox[self._end : self._end + n] = data
        self._end += n
        self._reserve(0)  # a length just read: room for the rest of its frame, counted from now

    @property
    def frame_rest(self) -> int:
        """Bytes still to come of a frame begun whose length is known and allowed, else 0
        (a length above the limit is refused by :meth:`next_event`, nothing reserved)."""
        if self._end - self._pos < HEADER.size:
            return 0
        (length,) = HEADER.unpack_from(self._inbox, self._pos)
        if length > self.frame_limit:
            return 0
        return max(0, HEADER.size + length - (self._end - self._pos))

    @property
    def reserved(self) -> int:
        """Bytes the receive buffer takes: what a peer makes this end hold, the room made
        for the rest of its frame included."""
        return len(self._inbox)

    def receive_buffer(self, limit: int) -> memoryview:
        """Room to read the rest of a frame begun into (``socket.recv_into``): at most
        ``limit`` bytes, ``room`` and the frame's rest.  Release the view, then call
        :meth:`received` with the count read.  The buffer is made once at the
        frame's exact size: the bytes read are not copied, and a large frame arriving
        in many reads does not regrow its buffer (and leave the heap with the
        pieces) read by read."""
        self._check_open()
        size = max(1, min(limit, self.room, self.frame_rest or limit))
        self._reserve(size)
        return memoryview(self._inbox)[self._end : self._end + size]

    def received(self, n: int) -> None:
        """``n`` bytes were written into the last :meth:`receive_buffer`."""
        self._check_open()
        if not 0 <= n <= len(self._inbox) - self._end:
            raise ValueError(f"{n} bytes received into a buffer of {len(self._inbox) - self._end}")
        self._end += n

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more bytes after those held (and, with a frame's length known,
        for all of that frame at once).  Held bytes move to the start of the buffer
        when it has room that way, else to a new buffer of the size needed."""
        held = self._end - self._pos
        need = max(n, self.frame_rest)
        if len(self._inbox) - self._end >= need:
            return
        with memoryview(self._inbox) as view:
            if len(self._inbox) >= held + need:  # in place: the bytes move down, through a copy (they may overlap)
                self._inbox[:held] = bytes(view[self._pos : self._end])
            else:  # a new buffer: one copy of what is held, straight into it
                new = bytearray(held + need)
                new[:held] = view[self._pos : self._end]
                self._inbox = new
        self._pos, self._end = 0, held

    def _consumed(self, end: int) -> None:
        """Frames up to ``end`` are events now.  On a store, once nothing is left the
        buffer goes at once: a peer that sent one large put and went quiet leaves it
        holding nothing.  A client keeps one of up to CLIENT_KEEP_BYTES for the next
        answer (let go after each 1 MiB answer, the next would be fresh memory to
        fault in, which costs about as much as the answer itself).  With bytes left,
        a length already among them gets the room for its frame now, so that what a
        peer makes this end hold is counted (``reserved``) before the next read."""
        if end == self._end:
            if self.role == "server" or len(self._inbox) > CLIENT_KEEP_BYTES:
                self._inbox = bytearray()
            self._pos = self._end = 0
        else:
            self._pos = end
            self._reserve(0)

    def next_event(self) -> Event | None:
        """The next complete message, or None when more bytes are needed (or the
        connection was closed by the last event: a refused hello)."""
        if self._state == _CLOSED:
            return None
        avail = self._end - self._pos
        if avail < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._inbox, self._pos)
        limit = self.frame_limit
        if length > limit:
            self._state = _CLOSED
            raise FrameTooLarge(f"frame of {length} bytes is larger than any message allowed now ({limit})")
        if avail < HEADER.size + length:
            return None
        start = self._pos + HEADER.size
        try:
            with memoryview(self._inbox) as view:
                obj = msgpack.unpackb(view[start : start + length],
                                      **(_REQUEST_LIMITS if self.role == "server" else _ANSWER_LIMITS))
        except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            raise self._fail(f"malformed message: {exc}") from None
        finally:
            self._consumed(start + length)
        return self._parse(obj)

    def _parse(self, obj: Any) -> Event:
        if not isinstance(obj, list) or not obj or not isinstance(obj[0], int):
            raise self._fail("message is not a msgpack-RPC array")
        kind = obj[0]
        if self._state == _AWAIT_WELCOME and kind != NOTIFICATION:
            raise self._fail("the server's first message must be its welcome")
        if kind == REQUEST and len(obj) == 4 and _is_msgid(obj[1]) and isinstance(obj[2], str):
            return self._request(obj[1], obj[2], obj[3])
        if kind == RESPONSE and len(obj) == 4 and _is_msgid(obj[1]):
            return self._response(obj[1], obj[2], obj[3])
        if kind == NOTIFICATION and len(obj) == 3 and isinstance(obj[1], str):
            return self._notification(obj[1], obj[2])
        raise self._fail(f"bad message shape (type {kind}, {len(obj)} fields)")

    def _notification(self, method: str, params: Any) -> Event:
        if method != Welcome.method or self.role != "client" or self._state != _AWAIT_WELCOME:
            raise self._fail(f"unexpected notification {method!r}")
        try:
            self.welcome = Welcome.from_wire(params)
        except MessageError as exc:
            raise self._fail(f"bad welcome: {exc}") from None
        self._state = _AWAIT_HELLO
        return self.welcome

    def _request(self, msgid: int, method: str, params: Any) -> Event:
        cls = REQUESTS.get(method)
        if self.role == "server" and self._state == _AWAIT_HELLO:
            if cls is not Hello:
                raise self._fail("first request must be hello")
            self._state = _HELLO_PENDING
            self._hello_msgid = msgid
        elif self._state != _ESTABLISHED:
            raise self._fail(f"{method!r} before the hello was answered")
        elif cls is Hello:
            raise self._fail("hello sent twice")
        if cls is None or cls.sent_by == self.role:
            return BadRequest(msgid, method, f"unknown method {method!r}")
        try:
            return RequestReceived(msgid, cls.from_wire(params))
        except MessageError as exc:
            return BadRequest(msgid, method, f"bad {method}: {exc}")

    def _response(self, msgid: int, error: Any, result: Any) -> Event:
        request = self._pending.pop(msgid, None)
        if request is None:
            raise self._fail(f"response to unknown msgid {msgid}")
        if error is not None:
            if not isinstance(error, str):
                raise self._fail(f"{request.method} error is not a string")
            if msgid == self._hello_msgid:
                self._state = _CLOSED
            return Response(msgid, request, None, error)
        try:
            answer = request.answer_from_wire(result)
        except MessageError as exc:
            raise self._fail(f"bad answer to {request.method}: {exc}") from None
        if msgid == self._hello_msgid and self.role == "client":
            self._state = _ESTABLISHED
        return Response(msgid, request, answer, None)

    def _fail(self, reason: str) -> ProtocolError:
        self._state = _CLOSED
        return ProtocolError(reason)

    def _check_open(self) -> None:
        if self._state == _CLOSED:
            raise ProtocolError("connection is closed")


@dataclass(frozen=True, slots=True)
class GetAnswerFrame:
    """A ``get`` answer laid out in its frame before it is filled: the store writes
    statuses, versions and page data straight into it, so a 1 MiB answer is one
    copy out of the slab, not three (the data, msgpack's buffer, the framing).
    Non-minimal msgpack (uint32 msgid, bin32 everywhere) is still msgpack."""

    frame: bytearray | mmap.mmap | memoryview
    statuses: memoryview  # n bytes
    seqs: memoryview  # n uint64, native order ("Q")
    data: memoryview  # n * PAGE_SIZE


_LITTLE = sys.byteorder == "little"
IN_PLACE = _LITTLE  # get answers can be built in their frame (versions are little-endian on the wire)
OWN_MAPPING_BYTES = 512 << 10


def get_answer_size(n: int) -> int:
    """Bytes of the frame of a get answer of ``n`` pages (see get_answer_frame)."""
    return HEADER.size + 24 + n * (1 + 8 + PAGE_SIZE)


class FramePool:
    """A few buffers for the largest answers, used again and again: no page faults
    and no heap growth for a stream of large gets, and a fixed amount of memory
    for them however many come at once (beyond the pool, answers get mappings of
    their own, returned to the kernel once sent).  Two: the pool is kept once
    made, so it is memory a crowd of peers asking for large answers leaves the
    store holding for good (four were a quarter of what 50 hostile connections
    grew it by); more at once is rare (swap reads 32 pages at most)."""

    def __init__(self, count: int = 2, size: int = 0) -> None:
        self.size = size or get_answer_size(MAX_GET_PAGES)
        self.count = count
        self._free: list[bytearray] = []
        self._made = 0

    def take(self) -> bytearray | None:
        if self._free:
            return self._free.pop()
        if self._made < self.count:
            self._made += 1
            return bytearray(self.size)
        return None

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)

    @property
    def in_use(self) -> int:
        return self._made - len(self._free)


def get_answer_frame(msgid: int, n: int, buffer: bytearray | None = None) -> GetAnswerFrame | None:
    """Room for the answer to a get of ``n`` pages, or None where the layout does
    not apply (a big-endian host: versions go little-endian on the wire).  In
    ``buffer`` (from a FramePool, zeroed here) when one is given."""
    if not _LITTLE:
        return None
    parts = [b"\x94\x01\xce", msgid.to_bytes(4, "big"), b"\xc0\x93"]
    offsets = []
    size = sum(map(len, parts))
    for length in (n, 8 * n, n * PAGE_SIZE):
        size += 5
        offsets.append((size, length))
        size += length
    # Large answers get memory of their own, returned to the kernel once sent: from
    # the heap, a burst of them (a peer flooding the largest gets) would leave the
    # daemon that much larger for good.  Swap's own reads (at most 32 pages) stay
    # on the heap, where there is no page fault to pay.
    total = HEADER.size + size
    frame: bytearray | mmap.mmap | memoryview
    if buffer is not None and len(buffer) >= total:
        frame = memoryview(buffer)[:total]
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), 0, total)
    elif total >= OWN_MAPPING_BYTES:
        frame = mmap.mmap(-1, total)
    else:
        frame = bytearray(total)
    HEADER.pack_into(frame, 0, size)
    at = HEADER.size
    for part in parts:
        frame[at : at + len(part)] = part
        at += len(part)
    for start, length in offsets:
        frame[HEADER.size + start - 5] = 0xC6
        frame[HEADER.size + start - 4 : HEADER.size + start] = length.to_bytes(4, "big")
    view = memoryview(frame)
    (s0, _), (q0, _), (d0, _) = ((HEADER.size + o, l) for o, l in offsets)
    return GetAnswerFrame(frame, view[s0 : s0 + n], view[q0 : q0 + 8 * n].cast("Q"), view[d0 : d0 + n * PAGE_SIZE])


# A message whose last field is page data at least this large (a put, a hand-back, a
# tier's get answer) is framed around it: one copy of the data, not three.
SPLICE_BYTES = 64 << 10
_EMPTY_BIN = b"\xc4\x00"  # msgpack bin 8 of length 0 (use_bin_type)


def _frame(obj: Any) -> bytes | bytearray:
    """The frame of ``obj``.  msgpack would copy large page data into its own buffer
    (growing it as it goes), then into the bytes it returns, and the length prefix
    would copy it a third time: a hand-back of 1 MiB briefly cost the store 3-4 MiB,
    and under a crowd these peaks were most of what it grew by.  So the data at the
    end of a message (the last leaf, in msgpack order the last bytes of the frame) is
    packed as an empty bin, and the frame is assembled once, at its exact size."""
    tail = _large_tail(obj)
    if tail is None:
        body = msgpack.packb(obj, use_bin_type=True)
        return HEADER.pack(len(body)) + body
    data = memoryview(tail[-1]).cast("B")  # its length in bytes (an array('Q') view counts items)
    head = msgpack.packb(_replace_tail(obj, b""), use_bin_type=True)
    assert head.endswith(_EMPTY_BIN)
    head = head[: -len(_EMPTY_BIN)]
    n = len(data)
    size = len(head) + 5 + n
    frame = bytearray(HEADER.size + size)
    HEADER.pack_into(frame, 0, size)
    at = HEADER.size + len(head)
    frame[HEADER.size : at] = head
    frame[at] = 0xC6  # bin 32
    frame[at + 1 : at + 5] = n.to_bytes(4, "big")
    frame[at + 5 :] = data
    return frame


def _large_tail(obj: Any) -> list[Any] | None:
    """The list whose last item is the message's last leaf, if that leaf is page data
    of SPLICE_BYTES or more."""
    while isinstance(obj, list) and obj:
        if isinstance(obj[-1], bytes | bytearray | memoryview):
            return obj if memoryview(obj[-1]).nbytes >= SPLICE_BYTES else None
        obj = obj[-1]
    return None


def _replace_tail(obj: Any, leaf: bytes) -> Any:
    """A copy of the nested lists down to the last leaf, which is ``leaf``."""
    if not isinstance(obj, list):
        return leaf
    return [*obj[:-1], _replace_tail(obj[-1], leaf)]


def _is_msgid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MSGID_MODULUS


def statuses(data: bytes) -> list[PageStatus]:
    """Decode a per-page status bin (for tests and tools; the page path indexes bytes)."""
    return [PageStatus(b) for b in data]
