"""trio client for the host store: pipelined requests on one connection, reconnecting by itself.

Any number of tasks may call at once; each request is one message and the
answers are matched to callers by msgid, in whatever order they come.  The
client never waits for the store on its own: callers put a deadline around
each call (the pager does), and a call on a connection that is down fails at
once with :class:`StoreUnavailable`, so a write can fall back to the backing
file without delay.  :meth:`HostClient.run` keeps the connection up, with
exponential backoff between attempts.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import trio

from hoststore import protocol as p
from hoststore.address import Address

log = logging.getLogger("vswapfs.hostclient")

RECEIVE_SIZE = 1 << 20


class StoreUnavailable(Exception):
    """No connection to the store, or it was lost while the request was in flight."""


class StoreError(Exception):
    """The store answered the request with an error."""


async def open_stream(address: Address) -> trio.abc.Stream:
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    response: p.Response | None = None


@dataclass
class ClientLinkCounters:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    host_restarts: int = 0  # the store came back as a new instance: the pages it held are gone


class _Link:
    """One live connection: the stream, its protocol state and the callers waiting on it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = p.Connection("client")
        self.waiters: dict[int, _Waiter] = {}
        self.send_lock = trio.Lock()
        self.broken = trio.Event()

    async def request(self, method: str, params: Any) -> Any:
        if self.broken.is_set():
            raise StoreUnavailable("connection lost")
        msgid, data = self.conn.send_request(method, params)
        waiter = self.waiters[msgid] = _Waiter()
        try:
            await self._send(data)
            await waiter.event.wait()
        finally:
            self.waiters.pop(msgid, None)
        if waiter.response is None:
            raise StoreUnavailable("connection lost")
        if waiter.response.error is not None:
            raise StoreError(str(waiter.response.error))
        return waiter.response.result

    async def _send(self, data: bytes) -> None:
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except trio.Cancelled:
                # A send cut short leaves a partial message on the wire: the
                # connection is unusable from here on.
                self.fail()
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.fail()
                raise StoreUnavailable(f"send failed: {exc}") from None

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    log.warning("host store closed the connection")
                    return
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not None:
                    await self._dispatch(event)
        except p.ProtocolError as exc:
            log.error("host store sent bad data, reconnecting: %s", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.warning("connection to host store lost: %s", exc)
        finally:
            self.fail()

    async def _dispatch(self, event: p.Event) -> None:
        if isinstance(event, p.Response):
            waiter = self.waiters.get(event.msgid)
            if waiter is not None:  # None: its caller gave up (timeout) and left
                waiter.response = event
                waiter.event.set()
        elif isinstance(event, p.Request):
            # No server-to-client methods exist yet; answer so the store is not left waiting.
            await self._send(self.conn.send_response(event.msgid, f"unknown method {event.method!r}", None))

    def fail(self) -> None:
        if not self.broken.is_set():
            self.broken.set()
            for waiter in self.waiters.values():
                waiter.event.set()


class HostClient:
    """A pager's connection to the store, kept up by :meth:`run`."""

    def __init__(
        self,
        address: Address,
        name: str,
        device_size: int,
        *,
        session: str | None = None,
        role: str = p.ROLE_PAGER,
        connect_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self.address = address
        self.name = name
        self.device_size = device_size
        self.session = session or secrets.token_hex(16)
        self.role = role
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.instance: str | None = None
        self.counters = ClientLinkCounters()
        self._link: _Link | None = None
        self._connected = trio.Event()

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.broken.is_set()

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._connected.wait()

    # -- calls ----------------------------------------------------------------

    async def call(self, method: str, params: Any) -> Any:
        link = self._link
        if link is None or link.broken.is_set():
            raise StoreUnavailable(f"not connected to {self.address}")
        return await link.request(method, params)

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        return await self.call(p.PUT, [first, seq, data])

    async def get(self, pages: list[int]) -> tuple[bytes, bytes]:
        status, data = await self.call(p.GET, [pages])
        return status, data

    async def invalidate(self, first: int, count: int, seq: int) -> int:
        return await self.call(p.INVALIDATE, [first, count, seq])

    async def stats(self) -> dict[str, Any]:
        return await self.call(p.STATS, {})

    # -- connection upkeep --------------------------------------------------------

    async def _open(self) -> _Link:
        with trio.move_on_after(self.connect_timeout):
            try:
                return _Link(await open_stream(self.address))
            except OSError as exc:
                raise StoreUnavailable(f"cannot connect to {self.address}: {exc.strerror or exc}") from None
        raise StoreUnavailable(f"cannot connect to {self.address} in {self.connect_timeout}s")

    async def _hello(self, link: _Link) -> None:
        with trio.move_on_after(self.connect_timeout):
            result = await link.request(p.HELLO, self._hello_params())
            self._note_instance(result.get("instance") if isinstance(result, dict) else None)
            return
        raise StoreUnavailable(f"no hello answer from {self.address} in {self.connect_timeout}s")

    def _hello_params(self) -> dict[str, Any]:
        return {
            "version": p.PROTOCOL_VERSION,
            "client": self.name,
            "role": self.role,
            "device_size": self.device_size,
            "session": self.session,
        }

    def _note_instance(self, instance: str | None) -> None:
        if self.instance is not None and instance != self.instance:
            self.counters.host_restarts += 1
            log.error("host store restarted: the pages it held for us are lost; reads of them will fail")
        self.instance = instance

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection up until cancelled.  Reports started after the first attempt,
        whether it succeeded or not (writes fall back to the backing file meanwhile)."""
        backoff = self.backoff_min
        started = False
        down_logged = False

        def report_started() -> None:
            nonlocal started
            if not started:
                task_status.started()
                started = True

        while True:
            try:
                await self._serve_link(report_started)
                backoff = self.backoff_min
                down_logged = False
            except (StoreUnavailable, StoreError) as exc:
                self.counters.connect_failures += 1
                if not down_logged:
                    log.warning("host store unavailable (%s); retrying in the background", exc)
                    down_logged = True
            report_started()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    async def _serve_link(self, on_connected: Callable[[], None]) -> None:
        """One connection, from connect to loss: hello, then serve callers until it breaks."""
        link = await self._open()
        refused: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.read_loop)
                try:
                    await self._hello(link)
                except (StoreUnavailable, StoreError) as exc:
                    # Caught here: raised from the nursery body it would leave
                    # wrapped in an ExceptionGroup, past run()'s handler.
                    refused = exc
                else:
                    self.counters.connects += 1
                    log.info("connected to host store at %s", self.address)
                    self._link = link
                    self._connected.set()
                    on_connected()
                    await link.broken.wait()
                    self.counters.disconnects += 1
                nursery.cancel_scope.cancel()
        finally:
            self._link = None
            if self._connected.is_set():
                self._connected = trio.Event()
            link.fail()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(link.stream)
        if refused is not None:
            raise refused


async def query(address: Address, method: str, params: Any, timeout: float = 5.0) -> Any:
    """One request on a fresh observer connection (for tools: ``vswapctl stats``)."""
    client = HostClient(address, "vswapctl", 0, role=p.ROLE_OBSERVER, connect_timeout=timeout)
    link = await client._open()
    answer: Any = None
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.read_loop)
            try:  # caught inside the nursery body, so it is not wrapped in an ExceptionGroup
                with trio.fail_after(timeout):
                    await client._hello(link)
                    answer = await link.request(method, params)
            except trio.TooSlowError:
                failure = StoreUnavailable(f"{address} did not answer in {timeout}s")
            except (StoreUnavailable, StoreError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    finally:
        link.fail()
        await trio.aclose_forcefully(link.stream)
    if failure is not None:
        raise failure
    return answer
