"""The trio side of one connection, shared by the store and its clients.

An :class:`Endpoint` owns a stream and its :class:`~pagewire.protocol.Connection`:
any number of tasks may send requests at once (answers are matched by msgid,
in whatever order they come), and :meth:`Endpoint.receive_loop` hands every
incoming request to the owner's handler.  Answers produced while one read's
worth of requests is handled leave in one write.

A store's endpoints also bound what peers can make it hold (the clients'
endpoints leave this off): each reads no more than one frame of the largest
size allowed (``Connection.room``); a frame begun must be finished within
``frame_timeout`` of waiting for the peer; and an :class:`InFlight` shared by
the connections of one pool caps the bytes they hold for their peers together
(the start of a frame, answers not yet taken), closing, when the cap is passed,
the connections whose peers have kept us waiting longest, and only those that
kept us waiting at least its ``floor``.  Requests the store itself sends (hand-
backs) count against a budget of their own (``request(..., budget=)``), not
the pool's: no peer made us hold them, and a pool's peers must not wait or be
closed for them; a peer that does not take them is closed past that budget
all the same.
"""

from __future__ import annotations

import math
import os
import socket
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import trio

from . import protocol as p

# The most one read takes, and the slices large writes go out in (each a
# checkpoint): the largest put, whole, so that a put costs one read and one write.
RECEIVE_SIZE = p.HEADER.size + p.MAX_REQUEST_FRAME
# Answers to one read's requests leave together, but never more than this
# waits in memory: a read full of small requests for large answers (gets)
# is answered as it goes, so the peer's reading pace bounds what we hold.
SEND_BATCH_BYTES = 1 << 20
# A read that does not continue a frame of known length takes at most this much (a
# batch of small requests; the start of a large frame, whose rest is then read
# straight into a buffer of its size): below glibc's mmap threshold, so that the
# read's buffer comes from the heap and costs no system call.
FIRST_READ = 64 << 10
SEND_SLICE = RECEIVE_SIZE
MAX_FDS = 4  # file descriptors a peer may pass us, in all (we expect one)
T = TypeVar("T")


class PeerGone(Exception):
    """The connection closed before the answer came."""


class FrameTimeout(Exception):
    """The peer began a frame and did not finish it within the endpoint's frame_timeout."""


class Holder(Protocol):
    def stalled(self, now: float) -> float: ...

    def shed(self) -> None: ...


class InFlight:
    """The bytes the store holds for the peers of one pool of connections, all
    together, under one cap: the start of a frame a peer has not finished sending,
    and a write of answers it has not finished taking.  Past the cap, the
    connections whose peers have kept us waiting longest (:meth:`Endpoint.stalled`)
    are closed (:meth:`Endpoint.shed`) until the rest fit, but only those that kept
    us waiting ``floor`` seconds or more: a peer taking what it is sent promptly is
    never closed for this, however much the pool holds.  A crowd of peers that
    start large frames and stall, or ask for large answers and never read them,
    costs the store this much once they have stalled ``floor`` seconds;
    :meth:`watch` closes them as they pass it.  Until then no connection of the
    pool reads a new message (:meth:`wait_room`): the pool's peers wait, and what
    the pool holds can grow past the cap only by what connections already reading
    bring in and answer."""

    def __init__(self, cap: int, floor: float = 0.0) -> None:
        self.cap = cap
        self.floor = floor
        self.total = 0
        self._held: dict[Holder, int] = {}
        self._over = trio.Event()  # set while the total is past the cap
        self._fits = trio.Event()  # set while it is not
        self._fits.set()

    def hold(self, endpoint: Holder, nbytes: int) -> None:
        """``endpoint`` holds ``nbytes`` now (in place of what it held before)."""
        self.release(endpoint)
        if nbytes:
            self._held[endpoint] = nbytes
            self.total += nbytes
            if self.total > self.cap:
                if self._fits.is_set():
                    self._fits = trio.Event()
                self.shed(trio.current_time())

    def release(self, endpoint: Holder) -> None:
        self.total -= self._held.pop(endpoint, 0)
        if self.total <= self.cap:
            self._fits.set()

    async def wait_room(self) -> None:
        """Return once the pool holds no more than its cap (at once, without a
        checkpoint, if it does: this is on every read's path)."""
        if not self._fits.is_set():
            await self._fits.wait()

    def shed(self, now: float) -> None:
        """Close the longest stalled (past the floor) until the total fits the cap;
        :meth:`watch` is woken if it still does not."""
        for endpoint in sorted(self._held, key=lambda e: e.stalled(now), reverse=True):
            if self.total <= self.cap or endpoint.stalled(now) < self.floor:
                break
            self.release(endpoint)
            endpoint.shed()
        if self.total > self.cap:
            self._over.set()

    def _next_check(self, now: float) -> float:
        """When the longest stalled connection (if it stays stalled) passes the floor,
        never sooner than a tenth of the floor from now (those not stalled now may
        never pass it: then this is a slow poll while the cap is passed)."""
        longest = max((e.stalled(now) for e in self._held), default=0.0)
        return now + max(self.floor - longest, self.floor / 10)

    async def watch(self) -> None:
        """Run by the server: while the cap is passed, close connections as their
        peers' stalls pass the floor (nothing else would notice: a stalled peer
        makes no more calls to :meth:`hold`)."""
        while True:
            await self._over.wait()
            now = trio.current_time()
            self.shed(now)
            if self.total <= self.cap:
                self._over = trio.Event()
                continue
            await trio.sleep_until(self._next_check(now))


class RemoteError(Exception):
    """The peer answered the request with an error."""


class _Waiting:
    """Time spent waiting for the peer on one thing: the rest of a frame, or the
    peer taking one write (only while waiting for the peer, not for our own turns)."""

    __slots__ = ("total", "since")

    def __init__(self) -> None:
        self.total = 0.0
        self.since: float | None = None

    def start(self) -> None:
        self.since = trio.current_time()

    def stop(self) -> None:
        if self.since is not None:
            self.total += trio.current_time() - self.since
            self.since = None

    def so_far(self, now: float) -> float:
        return self.total + (now - self.since if self.since is not None else 0.0)

    def reset(self) -> None:
        self.total = 0.0


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: p.Response | None = None


class Lent:
    """An answer in a pooled buffer: ``release`` gives the buffer back once it is
    sent (or once it never will be)."""

    __slots__ = ("data", "release")

    def __init__(self, data: memoryview, release: Callable[[], None]) -> None:
        self.data = data
        self.release = release


Handler = Callable[[p.RequestReceived | p.BadRequest], Awaitable[bytes | Lent | None]]


class Endpoint:
    def __init__(self, stream: trio.abc.Stream, conn: p.Connection,
                 pace: Callable[[int], Awaitable[None]] | None = None, accept_fds: bool = False, *,
                 inflight: InFlight | None = None, frame_timeout: float | None = None,
                 on_shed: Callable[[], None] | None = None) -> None:
        """``accept_fds``: read with recvmsg and keep file descriptors the peer passes
        (a client's shared page memory); otherwise the kernel closes any it sends.
        ``inflight``: the cap that what this endpoint holds for its peer counts
        against (the start of a frame, a write under way); ``on_shed`` is called if
        it closes this endpoint.  ``frame_timeout``: how long the peer may keep us
        waiting, in all, for the rest of a frame it began."""
        self.stream = stream
        self.conn = conn
        self.accept_fds = accept_fds
        self.received_fds: list[int] = []
        self.pace = pace  # awaited before each slice of a large write, with its size
        self.inflight = inflight
        self.frame_timeout = frame_timeout
        self.on_shed = on_shed
        self._frame = _Waiting()  # for the rest of the frame whose start we hold
        self._write = _Waiting()  # for the peer to take the write under way
        self._writing = 0  # bytes of the write under way
        self._holding = 0  # what the cap was last told this connection holds
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    def stalled(self, now: float) -> float:
        """How long the peer has kept us waiting, for the rest of the frame we hold the
        start of, or to take the write under way, whichever is longer."""
        return max(self._frame.so_far(now), self._write.so_far(now))

    def shed(self) -> None:
        """Closed to keep the bytes in flight under their cap (InFlight): at once."""
        self.close()
        if self.on_shed is not None:
            self.on_shed()

    async def request(self, message: p.Request, budget: InFlight | None = None) -> Any:
        """Send a request and wait for its typed answer.  The caller puts the deadline around it.
        ``budget``: what its bytes count against while the peer takes them, in place of
        the pool's (a store's own hand-back: not the peer's doing)."""
        if self.closed.is_set():
            raise PeerGone("connection closed")
        msgid, data, waiter = self._framed(message)
        try:
            await self.send(data, budget=budget)
            await waiter.event.wait()
        finally:
            self._waiters.pop(msgid, None)
        return self._answer(waiter)

    async def request_all(self, messages: Sequence[p.Request]) -> list[Any]:
        """Several requests in one write, and their typed answers in order: a batch the
        peer takes in parts still costs one write and one round trip, and no task per
        part.  The first error is raised once every answer came (or the connection
        went).  The caller puts the deadline around it."""
        if self.closed.is_set():
            raise PeerGone("connection closed")
        framed: list[tuple[int, bytes, _Waiter]] = []
        try:
            for message in messages:
                framed.append(self._framed(message))
            await self.send(b"".join(data for _, data, _ in framed))
            for _, _, waiter in framed:
                await waiter.event.wait()
        finally:
            for msgid, _, _ in framed:
                self._waiters.pop(msgid, None)
        return [self._answer(waiter) for _, _, waiter in framed]

    def _framed(self, message: p.Request) -> tuple[int, bytes, _Waiter]:
        """A request's msgid, its bytes, and the waiter its answer will wake."""
        try:
            msgid, data = self.conn.send_request(message)
        except p.ProtocolError as exc:
            self.close()
            raise PeerGone(str(exc)) from None
        waiter = self._waiters[msgid] = _Waiter()
        return msgid, data, waiter

    @staticmethod
    def _answer(waiter: _Waiter) -> Any:
        response = waiter.response
        if response is None:
            raise PeerGone("connection lost")
        if response.error is not None:
            raise RemoteError(response.error)
        return response.answer

    async def send(self, data: bytes, paced: bool = False, fds: list[int] | None = None,
                   budget: InFlight | None = None) -> None:
        """Write ``data`` whole.  ``paced``: large writes await ``self.pace`` before each
        slice (only the receive loop's own answers: a request this end sends, such as
        a hand-back, comes from another task and must not take that loop's turns).
        ``fds``: file descriptors passed along with the first bytes (unix sockets).
        The write counts against ``budget``, or without one the pool's cap (there is
        one), and the time the peer takes to take it is its stall.  Raises PeerGone,
        having written nothing more, once the connection is closed (by a cap, too)."""
        async with self._send_lock:
            own = budget is None  # the pool's
            budget = self.inflight if own else budget
            write = self.stream.send_all
            if budget is not None:
                write = self._timed_send_all
                if own:
                    self._writing = len(data)
                    self._hold()
                elif not self.closed.is_set():
                    budget.hold(self, len(data))
            try:
                if self.closed.is_set():  # before the first byte: closed now, perhaps by the cap just told
                    raise PeerGone("connection closed")
                if fds:
                    sock = self.stream.socket  # type: ignore[attr-defined]
                    sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))])
                    if sent < len(data):
                        await write(memoryview(data)[sent:])
                elif len(data) <= SEND_SLICE:
                    await write(data)
                else:  # one large answer must not hold the loop: other connections go in between
                    with memoryview(data) as view:
                        for at in range(0, len(view), SEND_SLICE):
                            if paced and self.pace is not None:
                                await self.pace(min(SEND_SLICE, len(view) - at))
                            if self.closed.is_set():  # closed from outside between two slices
                                raise PeerGone("connection closed")
                            await write(view[at : at + SEND_SLICE])
            except trio.Cancelled:
                # A send cut short leaves part of a frame on the wire: nothing
                # after it could be understood, so the connection is done.
                self.close()
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close()
                raise PeerGone(f"send failed: {exc}") from None
            finally:
                if budget is not None:
                    self._write.reset()  # nothing held for the peer to take now
                    if own:
                        self._writing = 0
                        self._hold()
                    else:
                        budget.release(self)

    async def _timed_send_all(self, data: bytes | memoryview) -> None:
        """One write, the time the peer takes to take it counted as waiting for it."""
        self._write.start()
        try:
            await self.stream.send_all(data)
        finally:
            self._write.stop()

    async def receive_loop(self, handle: Handler, on_event: Callable[[p.Event], None] | None = None,
                           on_progress: Callable[[], None] | None = None,
                           on_wait: Callable[[], None] | None = None) -> None:
        """Read until the peer hangs up.  Requests go to ``handle``; what it returns
        is sent once the read's events are all handled (or sooner, past
        SEND_BATCH_BYTES).  ``on_progress`` is called for every complete message,
        ``on_wait`` whenever the loop is about to wait for the peer (to read or to
        take what we send).
        Raises ProtocolError for a peer that broke the protocol; returns on EOF or
        a broken transport."""
        lent: list[Callable[[], None]] = []
        try:
            while not self.conn.closed:
                if on_wait is not None:
                    on_wait()
                if self.inflight is not None and not self.conn.buffered:
                    await self.inflight.wait_room()  # holding nothing: begin nothing while the pool is over
                if not await self._read():  # gone, or closed from outside while the read came
                    return
                if self.inflight is not None:
                    self._hold()
                out: list[bytes] = []
                out_bytes = 0
                while not self.conn.closed and (event := self.conn.next_event()) is not None:
                    self._frame.reset()  # whatever is left begins a new frame
                    if on_progress is not None:
                        on_progress()
                    if isinstance(event, p.Response):
                        self._deliver(event)
                    elif isinstance(event, p.RequestReceived | p.BadRequest):
                        answer = await handle(event)
                        if isinstance(answer, Lent):
                            lent.append(answer.release)
                            answer = answer.data
                        if answer:
                            out.append(answer)
                            out_bytes += len(answer)
                            if out_bytes >= SEND_BATCH_BYTES:
                                if on_wait is not None:
                                    on_wait()
                                if not await self._flush(out, lent):
                                    return
                                out_bytes = 0
                    elif on_event is not None:
                        on_event(event)
                if out:
                    if on_wait is not None:
                        on_wait()
                    if not await self._flush(out, lent):
                        return
                if self.inflight is not None:
                    self._hold()
        finally:
            for release in lent:  # never to be sent now
                release()
            self.close()

    async def _read(self) -> bool:
        """The next bytes from the peer into the connection, at most ``conn.room``; False
        once it is gone (or closed from outside while they came).  The rest of a frame
        whose length is known is read straight into the buffer made for it."""
        sock = getattr(self.stream, "socket", None)
        into = sock is not None and self.conn.frame_rest > 0
        try:
            if into:
                view = self.conn.receive_buffer(RECEIVE_SIZE)
                try:
                    n = await self._waiting_for_frame(lambda: self._receive_into(sock, view))
                finally:
                    view.release()
                if n and not self.closed.is_set():
                    self.conn.received(n)
                    return True
                return False
            size = min(FIRST_READ, self.conn.room)
            receive = self._receive_with_fds if self.accept_fds else self.stream.receive_some
            data = await self._waiting_for_frame(lambda: receive(size)) if self.conn.buffered else await receive(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        if not data or self.closed.is_set():
            return False
        self.conn.receive_data(data)
        return True

    async def _waiting_for_frame(self, receive: Callable[[], Awaitable[T]]) -> T:
        """More of a frame begun: the time waiting for it is the peer's (``stalled``), and
        all of it together may not pass ``frame_timeout`` (a store's endpoints; a
        client's neither time nor limit this)."""
        if self.inflight is None and self.frame_timeout is None:
            return await receive()
        deadline = math.inf
        if self.frame_timeout is not None:
            deadline = trio.current_time() + self.frame_timeout - self._frame.total
        self._frame.start()
        try:
            with trio.move_on_at(deadline):
                return await receive()
        finally:
            self._frame.stop()
        raise FrameTimeout(f"{self.conn.buffered} bytes of a frame, and nothing more for "
                           f"{self.frame_timeout:g}s of waiting")

    async def _receive_into(self, sock: Any, view: memoryview) -> int:
        if not self.accept_fds:
            return await sock.recv_into(view)
        n, ancdata, _flags, _addr = await sock.recvmsg_into([view], socket.CMSG_SPACE(4 * MAX_FDS),
                                                            socket.MSG_CMSG_CLOEXEC)
        self._keep_fds(ancdata)
        return n

    def _hold(self) -> None:
        """Tell the cap (there is one) what this connection holds for its peer now."""
        assert self.inflight is not None
        held = self.conn.reserved + self._writing
        if held != self._holding and not self.closed.is_set():
            self._holding = held
            self.inflight.hold(self, held)

    def move(self, inflight: InFlight) -> None:
        """Count against ``inflight`` from now on (the connection changed pools)."""
        if self.inflight is not None:
            self.inflight.release(self)
        self.inflight = inflight
        self._holding = 0
        if not self.closed.is_set():
            self._hold()

    async def _flush(self, out: list[Any], lent: list[Callable[[], None]]) -> bool:
        """Send and empty ``out``, then give pooled buffers back; False if the peer is gone."""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            await self.send(data, paced=True)
        except PeerGone:
            return False
        finally:
            del data
            while lent:
                lent.pop()()
        return True

    async def _receive_with_fds(self, size: int) -> bytes:
        sock = self.stream.socket  # type: ignore[attr-defined]
        data, ancdata, _flags, _addr = await sock.recvmsg(size, socket.CMSG_SPACE(4 * MAX_FDS),
                                                          socket.MSG_CMSG_CLOEXEC)
        self._keep_fds(ancdata)
        return data

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        """File descriptors that came with the bytes just read (at most MAX_FDS kept)."""
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.received_fds.extend(fds)
        while len(self.received_fds) > MAX_FDS:  # a peer cannot make us hold more
            os.close(self.received_fds.pop())

    def take_fds(self) -> list[int]:
        """The file descriptors received so far, now the caller's to close."""
        fds, self.received_fds = self.received_fds, []
        return fds

    def _close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    def _deliver(self, response: p.Response) -> None:
        waiter = self._waiters.get(response.msgid)
        if waiter is not None:  # None: its caller gave up (timeout) and left
            waiter.response = response
            waiter.event.set()

    def close(self) -> None:
        """Mark the connection dead and wake every caller still waiting for an answer."""
        if not self.closed.is_set():
            self.closed.set()
            self.conn.close()
            if self.inflight is not None:
                self.inflight.release(self)
            for waiter in self._waiters.values():
                waiter.event.set()

    async def aclose(self) -> None:
        self.close()
        self._close_fds()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
