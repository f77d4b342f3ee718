"""Sans-IO core of the vswapfs <-> hoststore protocol, shared by both sides.

Nothing here touches a socket or trio: bytes go in through
:meth:`Connection.receive_data` and come out as events from
:meth:`Connection.next_event`; messages go in through ``send_*`` and come out
as bytes for the caller to write.  Both ends of a connection may send requests
(the store will later ask clients to take pages back), so one class serves
both roles; only the hello handshake differs.

Message shapes are msgpack-RPC:

* request       ``[0, msgid, method, params]``
* response      ``[1, msgid, error, result]``
* notification  ``[2, method, params]``

The first message a client sends is the ``hello`` request; until the server
has answered it successfully, no other request may be sent or is accepted.

Page data travels as one ``bin`` per batch (N * 4096 bytes), and per-page
answers as one ``bin`` of N status bytes, so that a batch costs no Python
object per page on the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
PAGE_SIZE = 4096
MSGID_MODULUS = 1 << 32

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

# Largest batch one message may carry.  The kernel sends FUSE writes of at
# most 1 MiB (256 pages); 1024 pages leaves room without letting a peer make
# us buffer without bound.
MAX_BATCH_PAGES = 1024
MAX_BIN_LEN = MAX_BATCH_PAGES * PAGE_SIZE
MAX_BUFFER_SIZE = MAX_BIN_LEN + 64 * 1024
MAX_ARRAY_LEN = MAX_BATCH_PAGES + 16
MAX_MAP_LEN = 256
MAX_STR_LEN = 4096

# Methods.  Params and results are described next to each constant.
HELLO = "hello"
"""params {version, client, role, device_size, session}; result {version, server, instance, page_size}"""
PUT = "put"
"""params [first_page, seq, data]; result bin of one PageStatus per page"""
GET = "get"
"""params [pages (list of int)]; result [status bin, data bin of len(pages) * PAGE_SIZE]"""
INVALIDATE = "invalidate"
"""params [first_page, count, seq]; result number of pages dropped"""
STATS = "stats"
"""params {}; result {counter: value}"""

ROLE_PAGER = "pager"
ROLE_OBSERVER = "observer"


class PageStatus(enum.IntEnum):
    """One byte per page in a PUT or GET answer: stored, or why not."""

    STORED = 0
    REFUSED_PRESSURE = 1
    REFUSED_CAPACITY = 2
    REFUSED_QUOTA = 3
    REFUSED_OUTDATED = 4  # a newer version of the page (higher seq) is known
    MISSING = 5  # GET: the store does not hold this page


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; close the connection."""


@dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: Any


@dataclass(frozen=True, slots=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Any


Event = Request | Response | Notification


@dataclass
class Connection:
    """One end of a connection.  ``role`` is "client" (sends hello) or "server"."""

    role: str
    _unpacker: msgpack.Unpacker = field(init=False, repr=False)
    _next_msgid: int = 0
    _pending: dict[int, str] = field(default_factory=dict)
    _hello_msgid: int | None = None
    established: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        if self.role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {self.role!r}")
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            max_buffer_size=MAX_BUFFER_SIZE,
            max_bin_len=MAX_BIN_LEN,
            max_str_len=MAX_STR_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
            strict_map_key=True,
        )

    # -- outgoing -----------------------------------------------------------

    def send_request(self, method: str, params: Any) -> tuple[int, bytes]:
        """Frame a request; returns its msgid and the bytes to write."""
        self._check_open()
        if method == HELLO:
            if self.role != "client" or self._hello_msgid is not None:
                raise ProtocolError("only a client sends hello, once")
        elif not self.established:
            raise ProtocolError(f"{method!r} before the hello was answered")
        msgid = self._next_msgid
        self._next_msgid = (msgid + 1) % MSGID_MODULUS
        if msgid in self._pending:
            # 2**32 requests in flight cannot happen; a wrapped counter meeting
            # a live request means the peer never answers.
            raise ProtocolError(f"msgid {msgid} still pending after wrap-around")
        self._pending[msgid] = method
        if method == HELLO:
            self._hello_msgid = msgid
        return msgid, msgpack.packb([REQUEST, msgid, method, params], use_bin_type=True)

    def send_response(self, msgid: int, error: Any = None, result: Any = None) -> bytes:
        self._check_open()
        return msgpack.packb([RESPONSE, msgid, error, result], use_bin_type=True)

    def send_notification(self, method: str, params: Any) -> bytes:
        self._check_open()
        if not self.established:
            raise ProtocolError("notification before the hello was answered")
        return msgpack.packb([NOTIFICATION, method, params], use_bin_type=True)

    def accept_hello(self, msgid: int, result: Any) -> bytes:
        """Server: answer the hello request and open the connection for requests."""
        if self.role != "server" or self._hello_msgid != msgid:
            raise ProtocolError("accept_hello without a pending hello")
        self.established = True
        return self.send_response(msgid, None, result)

    def refuse_hello(self, msgid: int, error: str) -> bytes:
        """Server: answer the hello with an error; the caller then closes."""
        data = self.send_response(msgid, error, None)
        self.closed = True
        return data

    @property
    def pending(self) -> int:
        """Requests sent that have not been answered yet."""
        return len(self._pending)

    # -- incoming -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the transport (b"" is not EOF here: just nothing)."""
        self._check_open()
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise self._fail(f"message larger than {MAX_BUFFER_SIZE} bytes") from exc

    def next_event(self) -> Event | None:
        """The next complete message, or None when more bytes are needed."""
        self._check_open()
        try:
            obj = self._unpacker.unpack()
        except msgpack.OutOfData:
            return None
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise self._fail(f"malformed message: {exc}") from exc
        event = self._parse(obj)
        self._track(event)
        return event

    def _parse(self, obj: Any) -> Event:
        if not isinstance(obj, list) or not obj or not isinstance(obj[0], int):
            raise self._fail("message is not a msgpack-RPC array")
        kind = obj[0]
        if kind == REQUEST and len(obj) == 4 and _is_msgid(obj[1]) and isinstance(obj[2], str):
            return Request(obj[1], obj[2], obj[3])
        if kind == RESPONSE and len(obj) == 4 and _is_msgid(obj[1]):
            return Response(obj[1], obj[2], obj[3])
        if kind == NOTIFICATION and len(obj) == 3 and isinstance(obj[1], str):
            return Notification(obj[1], obj[2])
        raise self._fail(f"bad message shape (type {kind}, {len(obj)} fields)")

    def _track(self, event: Event) -> None:
        if isinstance(event, Response):
            if self._pending.pop(event.msgid, None) is None:
                raise self._fail(f"response to unknown msgid {event.msgid}")
            if event.msgid == self._hello_msgid and self.role == "client":
                self.established = event.error is None
            return
        if self.role == "server" and self._hello_msgid is None:
            if not (isinstance(event, Request) and event.method == HELLO):
                raise self._fail("first message must be a hello request")
            self._hello_msgid = event.msgid
            return
        if isinstance(event, Request) and event.method == HELLO:
            raise self._fail("hello sent twice")
        if not self.established:
            raise self._fail("message before the hello was answered")

    def _fail(self, reason: str) -> ProtocolError:
        self.closed = True
        return ProtocolError(reason)

    def _check_open(self) -> None:
        if self.closed:
            raise ProtocolError("connection is closed")


def _is_msgid(value: Any) -> bool:
    return isinstance(value, int) and 0 <= value < MSGID_MODULUS


def statuses(data: bytes) -> list[PageStatus]:
    """Decode a per-page status bin (for tests and tools; the page path indexes bytes)."""
    return [PageStatus(b) for b in data]
