"""Every message of the vswapfs <-> hoststore protocol, defined once.

Each request is a frozen dataclass that validates itself when built, whether
by the side that sends it or by :meth:`from_wire` on the side that receives
it: types, ranges, batch and length caps.  Each request also knows the shape
of its answer and checks an answer against itself (a ``put`` of N pages must
be answered with N statuses), so neither the server's dispatch nor the
client's packing repeats a shape by position.

Bulk data travels as one ``bin`` per batch: page data as N * 4096 bytes, page
numbers and sequence numbers as N little-endian uint64 (``array('Q')``), and
per-page statuses as N bytes.  No Python object per page crosses the wire.
"""

from __future__ import annotations

import enum
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vswapcommon.sizes import PAGE_SIZE

from .causes import HandBackCause, PageStatus
from .codec import region_bytes

# 3: a put carries at most MAX_PUT_PAGES pages on the wire (the hello answer says
# how many), where version 2 took MAX_BATCH_PAGES.
# 4: a shared layout may be compressed (a third word in each slot's header).
PROTOCOL_VERSION = 4
NONCE_SIZE = 16
PROOF_SIZE = 32  # HMAC-SHA256
SECRET_SIZE = 32

# The kernel sends FUSE writes of at most 1 MiB (256 pages); 1024 pages per
# batch (a put through shared staging memory, a hand-back) leaves room without
# letting a peer make anyone buffer without bound.
MAX_BATCH_PAGES = 1024
# A put whose pages travel in its frame: the store must hold the whole frame
# before it can act on it, so this (256 KiB) is what any one connection can make
# it hold.  A client splits larger batches into several puts, sent together.
MAX_PUT_PAGES = 64
# A get answer carries its pages' data: at most 1 MiB, so that a small request
# cannot make the store build (and buffer) a large answer.
MAX_GET_PAGES = 256
MAX_DEVICE_PAGES = 1 << 36  # 256 TiB: a protocol bound; a store caps lower (--max-device-size)
MAX_SEQ = (1 << 63) - 1
MAX_NAME_LEN = 256
MAX_TEXT_LEN = 1024

assert array("Q").itemsize == 8, "page lists are uint64 on the wire"
_LITTLE = sys.byteorder == "little"


class MessageError(ValueError):
    """A message whose shape or values the protocol does not allow."""


_PUT_STATUSES = bytes(s for s in PageStatus if s != PageStatus.MISSING)
_GET_STATUSES = bytes((PageStatus.STORED, PageStatus.MISSING))


class TakeStatus(enum.IntEnum):
    """One byte per page in a hand-back answer."""

    TAKEN = 0  # written to the client's backing file; the store may free it
    NOT_NEEDED = 1  # the client holds a newer version elsewhere (or none): free it
    FAILED = 2  # the client could not take it (backing I/O error): keep it


ROLE_PAGER = "pager"
ROLE_OBSERVER = "observer"
ROLES = (ROLE_PAGER, ROLE_OBSERVER)
# What a pager's pages are to the store.  Swap pages are the only copy: the store may
# refuse them, or hand them back, never lose them.  Ephemeral pages (clean file data,
# as tmem's ephemeral pools held) have a copy elsewhere: the store may drop any of
# them at any time, asking no one (pagewire.causes.DROP_CAUSES).
POOL_SWAP = "swap"
POOL_EPHEMERAL = "ephemeral"
POOLS = (POOL_SWAP, POOL_EPHEMERAL)


# -- field checks -------------------------------------------------------------------


def _int(value: Any, name: str, low: int = 0, high: int = MAX_SEQ) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise MessageError(f"{name} {value} is outside {low}..{high}")
    return value


def _text(value: Any, name: str, max_len: int = MAX_TEXT_LEN, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{name} must be a string, not {type(value).__name__}")
    if len(value) > max_len or (not value and not allow_empty):
        raise MessageError(f"{name} must be 1..{max_len} characters")
    if not value.isprintable():
        raise MessageError(f"{name} has unprintable characters")
    return value


def _bytes(value: Any, name: str, size: int | None = None, optional: bool = False) -> bytes | None:
    if value is None and optional:
        return None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise MessageError(f"{name} must be bytes, not {type(value).__name__}")
    if size is not None and len(value) != size:
        raise MessageError(f"{name} must be {size} bytes, not {len(value)}")
    return bytes(value) if not isinstance(value, bytes) else value


def check_client_name(name: Any) -> str:
    """A client name the protocol accepts (1..256 printable characters), or MessageError."""
    return _text(name, "client name", MAX_NAME_LEN)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise MessageError(f"{name} must be a boolean")
    return value


def _pool(value: Any) -> str:
    if value not in POOLS:
        raise MessageError(f"unknown pool {value!r} (one of {', '.join(POOLS)})")
    return value


def _fields(params: Any, n: int, name: str) -> list[Any]:
    if not isinstance(params, list | tuple) or len(params) != n:
        raise MessageError(f"{name} takes {n} parameters")
    return list(params)


def _map(params: Any, name: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise MessageError(f"{name} takes a map")
    return params


def u64s(values: Any, name: str = "list") -> array:
    """An ``array('Q')`` from a wire ``bin`` or from ints (for senders)."""
    if isinstance(values, array) and values.typecode == "Q":
        return values
    if isinstance(values, bytes | bytearray | memoryview):
        if len(values) % 8:
            raise MessageError(f"{name} of {len(values)} bytes is not whole uint64s")
        out = array("Q")
        out.frombytes(values)
        if not _LITTLE:
            out.byteswap()
        return out
    try:
        return array("Q", values)
    except (TypeError, OverflowError) as exc:
        raise MessageError(f"{name}: {exc}") from None


def u64s_to_wire(values: array) -> bytes:
    if _LITTLE:
        return values.tobytes()
    swapped = array("Q", values)
    swapped.byteswap()
    return swapped.tobytes()


def _pages_data(data: Any, n: int, name: str) -> bytes | memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"{name} must be bytes")
    if len(data) != n * PAGE_SIZE:
        raise MessageError(f"{name} of {len(data)} bytes is not {n} pages")
    return data


def _statuses(result: Any, n: int, allowed: bytes, name: str) -> bytes:
    if not isinstance(result, bytes) or len(result) != n:
        raise MessageError(f"{name} answer must be {n} status bytes")
    if result.translate(None, allowed):
        raise MessageError(f"{name} answer has an unknown status")
    return result


def _batch(n: int, name: str) -> None:
    if not 1 <= n <= MAX_BATCH_PAGES:
        raise MessageError(f"{name} of {n} pages is outside 1..{MAX_BATCH_PAGES}")


def _page_list(pages: array, name: str, cap: int = MAX_BATCH_PAGES) -> None:
    if not 1 <= len(pages) <= cap:
        raise MessageError(f"{name} of {len(pages)} pages is outside 1..{cap}")
    if max(pages) >= MAX_DEVICE_PAGES:
        raise MessageError(f"{name} has a page number past the protocol's limit")


# -- the handshake ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server's first message (a notification): who it is, and a fresh nonce
    that the client's reconnect proof and token proof must cover."""

    method: ClassVar[str] = "welcome"
    version: int
    server: str
    instance: str
    nonce: bytes
    auth_required: bool = False

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, 1 << 16)
        _text(self.server, "server", MAX_NAME_LEN)
        _text(self.instance, "instance", 64)
        _bytes(self.nonce, "nonce", NONCE_SIZE)
        _bool(self.auth_required, "auth_required")

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "server": self.server, "instance": self.instance,
                "nonce": self.nonce, "auth_required": self.auth_required}

    @classmethod
    def from_wire(cls, params: Any) -> "Welcome":
        m = _map(params, cls.method)
        try:
            return cls(m["version"], m["server"], m["instance"], m["nonce"], m.get("auth_required", False))
        except KeyError as exc:
            raise MessageError(f"welcome lacks {exc}") from None


def _round_up(n: int, to: int = PAGE_SIZE) -> int:
    return -(-n // to) * to


SHARED_HEADER_BYTES = 16  # per slot: (version, page), two uint64
SHARED_ZHEADER_BYTES = 24  # compressed: (version, page, where), three uint64 (``pagewire.sharedmem``)
MAX_STAGING_PAGES = 1 << 16


@dataclass(frozen=True, slots=True)
class SharedLayout:
    """Where things are in a client's shared page memory (``pagewire.sharedmem``):
    a header per slot, an index entry per device page, then the slots' data.
    Both ends compute it from the two counts, so a peer cannot describe a
    layout whose parts overlap or run past the end."""

    npages: int  # device pages: entries in the index
    slots: int  # page slots: the most pages the store can keep for this client
    staging: int = 0  # pages of the second memfd, the client's to write pages to put there
    compressed: bool = False  # pages kept compressed in size classes (``pagewire.codec``)

    def __post_init__(self) -> None:
        _int(self.npages, "shared npages", 1, MAX_DEVICE_PAGES)
        _int(self.slots, "shared slots", 1, self.npages)
        _int(self.staging, "shared staging", 0, MAX_STAGING_PAGES)
        if not isinstance(self.compressed, bool):
            raise MessageError(f"shared compressed must be true or false, not {self.compressed!r}")

    @property
    def header_words(self) -> int:
        return (SHARED_ZHEADER_BYTES if self.compressed else SHARED_HEADER_BYTES) // 8

    @property
    def header_offset(self) -> int:
        return 0

    @property
    def index_offset(self) -> int:
        return _round_up(self.slots * self.header_words * 8)

    @property
    def data_offset(self) -> int:
        return self.index_offset + _round_up(self.npages * 4)

    @property
    def size(self) -> int:
        return self.data_offset + self.data_size

    @property
    def data_size(self) -> int:
        return region_bytes(self.slots) if self.compressed else self.slots * PAGE_SIZE

    @property
    def staging_size(self) -> int:
        return self.staging * PAGE_SIZE

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"npages": self.npages, "slots": self.slots, "staging": self.staging}
        if self.compressed:
            wire["compressed"] = True
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> "SharedLayout | None":
        if value is None:
            return None
        m = _map(value, "shared layout")
        try:
            return cls(m["npages"], m["slots"], m.get("staging", 0), m.get("compressed", False))
        except KeyError as exc:
            raise MessageError(f"shared layout lacks {exc}") from None


@dataclass(frozen=True, slots=True)
class HelloAnswer:
    instance: str  # the store's instance: a new one means its pages are gone
    resumed: bool  # the store kept this client's pages from an earlier connection
    secret: bytes  # the client's reconnect secret (wrapped when a token is configured)
    page_size: int = PAGE_SIZE
    max_put_pages: int = MAX_PUT_PAGES  # pages a put may carry on the wire
    admin: bool = False
    auth: bytes | None = None  # the server's token proof, when a token is configured
    # The client's shared page memory, when it asked for it and the store gives it (its
    # memfd travels with this answer's bytes, SCM_RIGHTS); None: pages only on the wire.
    shared: SharedLayout | None = None
    # The pool the store keeps the client's pages in: a store older than pools says
    # nothing, which means swap, so an ephemeral client can tell it was not understood.
    pool: str = POOL_SWAP

    def __post_init__(self) -> None:
        _text(self.instance, "instance", 64)
        _pool(self.pool)
        _bool(self.resumed, "resumed")
        _bytes(self.secret, "secret", SECRET_SIZE)
        _int(self.page_size, "page_size", PAGE_SIZE, PAGE_SIZE)
        _int(self.max_put_pages, "max_put_pages", 1, MAX_PUT_PAGES)
        _bool(self.admin, "admin")
        _bytes(self.auth, "auth", PROOF_SIZE, optional=True)

    def to_wire(self) -> dict[str, Any]:
        return {"instance": self.instance, "resumed": self.resumed, "secret": self.secret,
                "page_size": self.page_size, "max_put_pages": self.max_put_pages,
                "admin": self.admin, "auth": self.auth,
                "shared": None if self.shared is None else self.shared.to_wire(), "pool": self.pool}


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's first request.  ``instance`` names this client process; a
    reconnect of the same instance carries ``proof`` (see ``pagewire.auth``)."""

    method: ClassVar[str] = "hello"
    sent_by: ClassVar[str] = "client"
    version: int
    client: str
    role: str
    device_size: int
    instance: str
    nonce: bytes
    proof: bytes | None = None
    auth: bytes | None = None
    shared: bool = False  # asks for shared page memory (only on a unix socket, where an fd can pass)
    pool: str = POOL_SWAP  # what its pages are to the store (POOLS)

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, 1 << 16)
        _bool(self.shared, "shared")
        _pool(self.pool)
        check_client_name(self.client)
        if self.role not in ROLES:
            raise MessageError(f"unknown role {self.role!r}")
        _int(self.device_size, "device_size", 0, MAX_DEVICE_PAGES * PAGE_SIZE)
        if self.role == ROLE_PAGER and (self.device_size <= 0 or self.device_size % PAGE_SIZE):
            raise MessageError(f"device size {self.device_size} is not a positive multiple of {PAGE_SIZE}")
        _text(self.instance, "instance", 64)
        _bytes(self.nonce, "nonce", NONCE_SIZE)
        _bytes(self.proof, "proof", PROOF_SIZE, optional=True)
        _bytes(self.auth, "auth", PROOF_SIZE, optional=True)

    @property
    def npages(self) -> int:
        return self.device_size // PAGE_SIZE

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "client": self.client, "role": self.role,
                "device_size": self.device_size, "instance": self.instance, "nonce": self.nonce,
                "proof": self.proof, "auth": self.auth, "shared": self.shared, "pool": self.pool}

    @classmethod
    def from_wire(cls, params: Any) -> "Hello":
        m = _map(params, cls.method)
        version = m.get("version")
        if version != PROTOCOL_VERSION:
            # Checked first, so that an old client hears the real reason.
            raise MessageError(f"protocol version {version!r} not supported (this end speaks {PROTOCOL_VERSION})")
        try:
            return cls(version, m["client"], m["role"], m["device_size"], m["instance"], m["nonce"],
                       m.get("proof"), m.get("auth"), m.get("shared", False), m.get("pool", POOL_SWAP))
        except KeyError as exc:
            raise MessageError(f"hello lacks {exc}") from None

    def answer_to_wire(self, answer: HelloAnswer) -> Any:
        return answer.to_wire()

    def answer_from_wire(self, result: Any) -> HelloAnswer:
        m = _map(result, "hello answer")
        try:
            return HelloAnswer(m["instance"], m["resumed"], m["secret"], m.get("page_size", PAGE_SIZE),
                               m.get("max_put_pages", MAX_PUT_PAGES), m.get("admin", False), m.get("auth"),
                               SharedLayout.from_wire(m.get("shared")), m.get("pool", POOL_SWAP))
        except KeyError as exc:
            raise MessageError(f"hello answer lacks {exc}") from None


# -- pages --------------------------------------------------------------------------


class _PutAnswer:
    """A put's answer, whichever way its pages came: one status byte per page."""

    __slots__ = ()
    method: ClassVar[str]
    n: int

    def answer_to_wire(self, statuses: bytes) -> Any:
        return statuses

    def answer_from_wire(self, result: Any) -> bytes:
        return _statuses(result, self.n, _PUT_STATUSES, self.method)


@dataclass(frozen=True, slots=True)
class Put(_PutAnswer):
    """Offer pages ``first .. first + n`` (one FUSE write), version ``seq``;
    answered with one :class:`PageStatus` per page."""

    method: ClassVar[str] = "put"
    sent_by: ClassVar[str] = "client"
    first: int
    seq: int
    data: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        _int(self.first, "first page", 0, MAX_DEVICE_PAGES)
        _int(self.seq, "seq", 1, MAX_SEQ)
        if not isinstance(self.data, bytes | bytearray | memoryview) or len(self.data) % PAGE_SIZE:
            raise MessageError("put data must be whole pages")
        _batch(len(self.data) // PAGE_SIZE, "put")

    @property
    def n(self) -> int:
        return len(self.data) // PAGE_SIZE

    def to_wire(self) -> list[Any]:
        return [self.first, self.seq, self.data]

    @classmethod
    def from_wire(cls, params: Any) -> "Put":
        first, seq, data = _fields(params, 3, cls.method)
        return cls(first, seq, data)


@dataclass(frozen=True, slots=True)
class PutStaged(_PutAnswer):
    """As :class:`Put`, the pages' data already in the client's staging memory
    (shared, ``SharedLayout.staging``) at page ``at``: the message carries none."""

    method: ClassVar[str] = "put_staged"
    sent_by: ClassVar[str] = "client"
    first: int
    seq: int
    at: int
    n: int

    def __post_init__(self) -> None:
        _int(self.first, "first page", 0, MAX_DEVICE_PAGES)
        _int(self.seq, "seq", 1, MAX_SEQ)
        _int(self.at, "staging page", 0, MAX_STAGING_PAGES)
        _batch(self.n, "put")

    def to_wire(self) -> list[Any]:
        return [self.first, self.seq, self.at, self.n]

    @classmethod
    def from_wire(cls, params: Any) -> "PutStaged":
        return cls(*_fields(params, 4, cls.method))


@dataclass(frozen=True, slots=True)
class GetAnswer:
    statuses: bytes  # STORED or MISSING per page
    seqs: array  # the version of each page returned (0 where missing)
    data: bytes | memoryview  # len(pages) * PAGE_SIZE; zeros where missing

    def to_wire(self) -> list[Any]:
        return [self.statuses, u64s_to_wire(self.seqs), self.data]


@dataclass(frozen=True, slots=True)
class Get:
    """Fetch pages (any order, any set); answered with status, version and data of each."""

    method: ClassVar[str] = "get"
    sent_by: ClassVar[str] = "client"
    pages: array

    def __post_init__(self) -> None:
        object.__setattr__(self, "pages", u64s(self.pages, "pages"))
        _page_list(self.pages, "get", MAX_GET_PAGES)

    def to_wire(self) -> list[Any]:
        return [u64s_to_wire(self.pages)]

    @classmethod
    def from_wire(cls, params: Any) -> "Get":
        (pages,) = _fields(params, 1, cls.method)
        if not isinstance(pages, bytes):
            raise MessageError("get pages must be a bin of uint64")
        return cls(u64s(pages, "pages"))

    def answer_to_wire(self, answer: GetAnswer) -> Any:
        return answer.to_wire()

    def answer_from_wire(self, result: Any) -> GetAnswer:
        statuses, seqs, data = _fields(result, 3, "get answer")
        n = len(self.pages)
        statuses = _statuses(statuses, n, _GET_STATUSES, self.method)
        if not isinstance(seqs, bytes) or len(seqs) != 8 * n:
            raise MessageError(f"get answer must carry {n} sequence numbers")
        return GetAnswer(statuses, u64s(seqs), _pages_data(data, n, "get data"))


@dataclass(frozen=True, slots=True)
class Invalidate:
    """Drop pages ``first .. first + count`` whose stored version is not newer than ``seq``."""

    method: ClassVar[str] = "invalidate"
    sent_by: ClassVar[str] = "client"
    first: int
    count: int
    seq: int

    def __post_init__(self) -> None:
        _int(self.first, "first page", 0, MAX_DEVICE_PAGES)
        _int(self.count, "count", 1, MAX_DEVICE_PAGES)
        _int(self.seq, "seq", 1, MAX_SEQ)

    def to_wire(self) -> list[Any]:
        return [self.first, self.count, self.seq]

    @classmethod
    def from_wire(cls, params: Any) -> "Invalidate":
        return cls(*_fields(params, 3, cls.method))

    def answer_to_wire(self, dropped: int) -> Any:
        return dropped

    def answer_from_wire(self, result: Any) -> int:
        return _int(result, "invalidate answer", 0, self.count)


@dataclass(frozen=True, slots=True)
class HandBack:
    """Store -> client: take these pages back into your backing file.  The store
    frees a page only after the answer says TAKEN or NOT_NEEDED for it."""

    method: ClassVar[str] = "handback"
    sent_by: ClassVar[str] = "server"
    cause: str
    pages: array
    seqs: array
    data: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        if self.cause not in tuple(HandBackCause):
            raise MessageError(f"unknown hand-back cause {self.cause!r}")
        object.__setattr__(self, "pages", u64s(self.pages, "pages"))
        object.__setattr__(self, "seqs", u64s(self.seqs, "seqs"))
        pages, seqs = self.pages, self.seqs
        _page_list(pages, self.method)
        if len(seqs) != len(pages) or min(seqs) < 1 or max(seqs) > MAX_SEQ:
            raise MessageError("hand-back needs one sequence number (1..2**63-1) per page")
        _pages_data(self.data, len(pages), "hand-back data")

    def to_wire(self) -> list[Any]:
        return [self.cause, u64s_to_wire(self.pages), u64s_to_wire(self.seqs), self.data]

    @classmethod
    def from_wire(cls, params: Any) -> "HandBack":
        cause, pages, seqs, data = _fields(params, 4, cls.method)
        if not isinstance(pages, bytes) or not isinstance(seqs, bytes):
            raise MessageError("hand-back pages and seqs must be bins of uint64")
        return cls(cause, u64s(pages, "pages"), u64s(seqs, "seqs"), data)

    def answer_to_wire(self, statuses: bytes) -> Any:
        return statuses

    def answer_from_wire(self, result: Any) -> bytes:
        return _statuses(result, len(self.pages), bytes(TakeStatus), self.method)


# -- control ------------------------------------------------------------------------


class _Parameterless:
    """A request with no parameters, answered with a map."""

    method: ClassVar[str]
    sent_by: ClassVar[str] = "client"

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, params: Any) -> Any:
        if params not in ({}, None, []):
            raise MessageError(f"{cls.method} takes no parameters")
        return cls()

    def answer_to_wire(self, answer: dict[str, Any]) -> Any:
        return answer

    def answer_from_wire(self, result: Any) -> dict[str, Any]:
        return _map(result, f"{self.method} answer")


@dataclass(frozen=True, slots=True)
class Stats(_Parameterless):
    """The store's counters (for a pager: its own client's; for an admin: all)."""

    method: ClassVar[str] = "stats"


@dataclass(frozen=True, slots=True)
class Drain(_Parameterless):
    """Admin: stop admitting, hand every client its pages back, then exit.
    Answered when the drain is over, with what was handed back and what was dropped."""

    method: ClassVar[str] = "drain"


@dataclass(frozen=True, slots=True)
class Evict:
    """Admin: drop every page of client ``client``, which must be away (not connected),
    and forget it, which frees its name; answered {"client": NAME, "dropped": PAGES}.
    A connected client is refused: it would lose pages it is using.  So is one away
    for less than the store's away timeout, unless ``force``: it may be reconnecting."""

    method: ClassVar[str] = "evict"
    sent_by: ClassVar[str] = "client"
    client: str
    force: bool = False

    def __post_init__(self) -> None:
        check_client_name(self.client)
        if not isinstance(self.force, bool):
            raise MessageError("evict's force must be true or false")

    def to_wire(self) -> list[Any]:
        return [self.client, self.force]

    @classmethod
    def from_wire(cls, params: Any) -> "Evict":
        client, force = _fields(params, 2, cls.method)
        return cls(client, force)

    def answer_to_wire(self, answer: dict[str, Any]) -> Any:
        return answer

    def answer_from_wire(self, result: Any) -> dict[str, Any]:
        m = _map(result, "evict answer")
        if not isinstance(m.get("client"), str) or not isinstance(m.get("dropped"), int):
            raise MessageError("evict answer lacks client or dropped")
        return m


@dataclass(frozen=True, slots=True)
class Configure:
    """Admin: change a running store's admission policy and limits (what is None
    stays as it is); answered with the policy and limits now in force.  Empty, it
    only asks for them."""

    method: ClassVar[str] = "configure"
    sent_by: ClassVar[str] = "client"
    policy: str | None = None  # a SPEC (hoststore.policies)
    capacity: int | None = None  # bytes, all clients together
    high_percent: float | None = None
    low_percent: float | None = None
    quotas: dict[str, int] | None = None  # bytes by client name; "" sets the default quota

    def __post_init__(self) -> None:
        if self.policy is not None:
            _text(self.policy, "policy", MAX_TEXT_LEN)
        if self.capacity is not None:
            _int(self.capacity, "capacity", 0, MAX_DEVICE_PAGES * PAGE_SIZE)
        for name in ("high_percent", "low_percent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                      or not 0 < value <= 100):
                raise MessageError(f"{name} must be a percentage in (0, 100]")
        if self.quotas is not None:
            m = _map(self.quotas, "quotas")
            if len(m) > 1024:
                raise MessageError("at most 1024 quotas at once")
            for name, size in m.items():
                if name != "":
                    check_client_name(name)
                _int(size, f"quota of {name!r}", 0, MAX_DEVICE_PAGES * PAGE_SIZE)

    def to_wire(self) -> dict[str, Any]:
        return {"policy": self.policy, "capacity": self.capacity, "high_percent": self.high_percent,
                "low_percent": self.low_percent, "quotas": self.quotas}

    @classmethod
    def from_wire(cls, params: Any) -> "Configure":
        m = _map(params, cls.method)
        return cls(m.get("policy"), m.get("capacity"), m.get("high_percent"), m.get("low_percent"),
                   m.get("quotas"))

    def answer_to_wire(self, answer: dict[str, Any]) -> Any:
        return answer

    def answer_from_wire(self, result: Any) -> dict[str, Any]:
        return _map(result, "configure answer")


@dataclass(frozen=True, slots=True)
class TraceRead:
    """Admin: the store's decisions since the last read (waiting up to ``wait`` seconds
    for one), every ``sample``-th of them; answered {"events": [...], "dropped": N}."""

    method: ClassVar[str] = "trace_read"
    sent_by: ClassVar[str] = "client"
    sample: int = 1
    wait: float = 1.0
    max_events: int = 256

    def __post_init__(self) -> None:
        _int(self.sample, "sample", 1, 1 << 20)
        _int(self.max_events, "max_events", 1, 4096)
        if not isinstance(self.wait, int | float) or isinstance(self.wait, bool) or not 0 <= self.wait <= 30:
            raise MessageError("wait must be 0..30 seconds")

    def to_wire(self) -> list[Any]:
        return [self.sample, self.wait, self.max_events]

    @classmethod
    def from_wire(cls, params: Any) -> "TraceRead":
        return cls(*_fields(params, 3, cls.method))

    def answer_to_wire(self, answer: dict[str, Any]) -> Any:
        return answer

    def answer_from_wire(self, result: Any) -> dict[str, Any]:
        m = _map(result, "trace answer")
        if not isinstance(m.get("events"), list) or not isinstance(m.get("dropped"), int):
            raise MessageError("trace answer lacks events or dropped")
        return m


Request = Hello | Put | PutStaged | Get | Invalidate | HandBack | Stats | Drain | Evict | Configure | TraceRead
REQUESTS: dict[str, type[Request]] = {  # type: ignore[misc]
    cls.method: cls for cls in (Hello, Put, PutStaged, Get, Invalidate, HandBack, Stats, Drain, Evict, Configure,
                                TraceRead)
}
