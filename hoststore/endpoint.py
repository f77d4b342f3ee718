"""The trio side of one connection, shared by the store and its clients.

An :class:`Endpoint` owns a stream and its :class:`~hoststore.protocol.Connection`:
any number of tasks may send requests at once (answers are matched by msgid,
in whatever order they come), and :meth:`Endpoint.receive_loop` hands every
incoming request to the owner's handler.  Answers produced while one read's
worth of requests is handled leave in one write.
"""

from __future__ import annotations

import os
import socket
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import protocol as p

RECEIVE_SIZE = 1 << 18
# Answers to one read's requests leave together, but never more than this
# waits in memory: a read full of small requests for large answers (gets)
# is answered as it goes, so the peer's reading pace bounds what we hold.
SEND_BATCH_BYTES = 1 << 20
SEND_SLICE = 1 << 18  # larger writes go out in slices, each a checkpoint
MAX_FDS = 4  # file descriptors a peer may pass us, in all (we expect one)


class PeerGone(Exception):
    """The connection closed before the answer came."""


class RemoteError(Exception):
    """The peer answered the request with an error."""


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
                 pace: Callable[[int], Awaitable[None]] | None = None, accept_fds: bool = False) -> None:
        """``accept_fds``: read with recvmsg and keep file descriptors the peer passes
        (a client's shared page memory); otherwise the kernel closes any it sends."""
        self.stream = stream
        self.conn = conn
        self.accept_fds = accept_fds
        self.received_fds: list[int] = []
        self.pace = pace  # awaited before each slice of a large write, with its size
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    async def request(self, message: p.Request) -> Any:
        """Send a request and wait for its typed answer.  The caller puts the deadline around it."""
        if self.closed.is_set():
            raise PeerGone("connection closed")
        try:
            msgid, data = self.conn.send_request(message)
        except p.ProtocolError as exc:
            self.close()
            raise PeerGone(str(exc)) from None
        waiter = self._waiters[msgid] = _Waiter()
        try:
            await self.send(data)
            await waiter.event.wait()
        finally:
            self._waiters.pop(msgid, None)
        response = waiter.response
        if response is None:
            raise PeerGone("connection lost")
        if response.error is not None:
            raise RemoteError(response.error)
        return response.answer

    async def send(self, data: bytes, paced: bool = False, fds: list[int] | None = None) -> None:
        """Write ``data`` whole.  ``paced``: large writes await ``self.pace`` before each
        slice (only the receive loop's own answers: a request this end sends, such as
        a hand-back, comes from another task and must not take that loop's turns).
        ``fds``: file descriptors passed along with the first bytes (unix sockets)."""
        async with self._send_lock:
            if self.closed.is_set():
                raise PeerGone("connection closed")
            try:
                if fds:
                    sock = self.stream.socket  # type: ignore[attr-defined]
                    sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))])
                    if sent < len(data):
                        await self.stream.send_all(memoryview(data)[sent:])
                elif len(data) <= SEND_SLICE:
                    await self.stream.send_all(data)
                else:  # one large answer must not hold the loop: other connections go in between
                    with memoryview(data) as view:
                        for at in range(0, len(view), SEND_SLICE):
                            if paced and self.pace is not None:
                                if self.closed.is_set():
                                    raise PeerGone("connection closed")
                                await self.pace(min(SEND_SLICE, len(view) - at))
                            await self.stream.send_all(view[at : at + SEND_SLICE])
            except trio.Cancelled:
                # A send cut short leaves part of a frame on the wire: nothing
                # after it could be understood, so the connection is done.
                self.close()
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close()
                raise PeerGone(f"send failed: {exc}") from None

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
                try:
                    data = await (self._receive_with_fds() if self.accept_fds
                                  else self.stream.receive_some(RECEIVE_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data:
                    return
                self.conn.receive_data(data)
                out: list[bytes] = []
                out_bytes = 0
                while not self.conn.closed and (event := self.conn.next_event()) is not None:
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
        finally:
            for release in lent:  # never to be sent now
                release()
            self.close()

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

    async def _receive_with_fds(self) -> bytes:
        sock = self.stream.socket  # type: ignore[attr-defined]
        data, ancdata, _flags, _addr = await sock.recvmsg(RECEIVE_SIZE, socket.CMSG_SPACE(4 * MAX_FDS),
                                                          socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.received_fds.extend(fds)
        while len(self.received_fds) > MAX_FDS:  # a peer cannot make us hold more
            os.close(self.received_fds.pop())
        return data

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
            for waiter in self._waiters.values():
                waiter.event.set()

    async def aclose(self) -> None:
        self.close()
        self._close_fds()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
