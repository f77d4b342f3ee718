"""The msgpack client of a hoststore: pipelined requests on one connection that
keeps itself up (:class:`HostClient`, a :class:`~vswapfs.pagestore.PageStore`).

Any number of tasks may call at once; answers are matched to callers by msgid,
in whatever order they come.  A call on a connection that is down fails at
once with :class:`StoreUnavailable`, so a write can fall back to the backing
file without delay; callers put their own deadline around each call.
:meth:`HostClient.run` reconnects with exponential backoff and proves, at each
reconnect, that it is the instance the store knows (``pagewire.auth``), so
the store keeps its pages.

Whatever the store sends that the protocol does not allow closes the
connection, is counted, and is followed by a reconnect; nothing it sends can
raise out of here.
"""

from __future__ import annotations

import logging
import os
import secrets
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import trio

from pagewire import auth
from pagewire import protocol as p
from pagewire.access import peer_uid, tcp_refusal
from pagewire.address import Address
from vswapcommon.counters import Counters
from pagewire.endpoint import Endpoint, PeerGone, RemoteError
from pagewire.sharedmem import SharedError, SharedPages
from pagewire.messages import (POOL_SWAP, ROLE_OBSERVER, ROLE_PAGER, GetAnswer, Get, HandBack, Hello, HelloAnswer, Invalidate, MAX_PUT_PAGES, PAGE_SIZE, Put, PutStaged, Request, Stats, Welcome)

from .pagestore import HandBackHandler, PagesLostHandler, StoreAuthError, StoreError, StoreUnavailable
from .linkcounters import LinkCounter
from .linkhandback import HandBackTaker

log = logging.getLogger("vswapfs.hostclient")



KEEPALIVE_INTERVAL = 60.0  # well inside the store's idle timeout (300 s by default)


async def open_stream(address: Address) -> trio.abc.Stream:
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


def check_store_peer(stream: trio.abc.Stream) -> None:
    """On a unix socket the kernel names the store's uid: only root or our own user
    may hold our pages (someone else may have bound the path while the store was down)."""
    uid = peer_uid(stream)
    if uid is not None and uid not in (0, os.geteuid()):
        raise StoreAuthError(f"the process listening there runs as uid {uid}, not root or our own user")


class HostClient:
    """A pager's connection to the store, kept up by :meth:`run`."""

    def __init__(
        self,
        address: Address,
        name: str,
        device_size: int,
        *,
        role: str = ROLE_PAGER,
        token: bytes | None = None,
        keepalive: float = KEEPALIVE_INTERVAL,
        connect_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        share: bool = True,
        insecure_tcp: bool = False,
        pool: str = POOL_SWAP,
    ) -> None:
        """``share``: on a unix socket, ask the store for shared page memory, so that
        reads of pages it holds need no round trip (see ``pagewire.sharedmem``).
        ``insecure_tcp``: use TCP without a token (loopback only), where nothing proves
        the store is the store; without it, TCP without a token is refused here
        (StoreAuthError), before any connection.  ``pool``: what the pages are to the
        store (``pagewire.messages.POOLS``): swap pages, the only copy, or ephemeral
        ones that it may drop at any time."""
        problem = tcp_refusal(address, token is not None, insecure_tcp)
        if problem is not None:
            raise StoreAuthError(problem)
        self.address = address
        self.name = name
        self.device_size = device_size
        self.role = role
        self.pool = pool
        self.token = token
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.share = share and address.kind == "unix" and role == ROLE_PAGER
        self._shared: SharedPages | None = None
        self.instance = secrets.token_hex(16)  # this process, as the store knows it
        self.secret: bytes | None = None
        self.store_instance: str | None = None
        self.hello_answer: HelloAnswer | None = None
        self.counters: Counters[LinkCounter] = Counters(LinkCounter)
        self._epoch = 0
        self._endpoint: Endpoint | None = None
        self._connected = trio.Event()
        self._on_pages_lost: PagesLostHandler | None = None
        self.taker = HandBackTaker(self.counters)

    # -- the PageStore contract ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._endpoint is not None and not self._endpoint.closed.is_set()

    @property
    def epoch(self) -> int:
        return self._epoch

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._connected.wait()

    def set_handlers(self, on_handback: HandBackHandler, on_pages_lost: PagesLostHandler) -> None:
        self.taker.on_handback = on_handback
        self._on_pages_lost = on_pages_lost

    async def put(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        """Through the staging area shared with the store where there is one and it has
        room (the data does not travel on the socket), on the wire otherwise."""
        shared = self._shared
        staging = shared.staging if shared is not None else None
        n = len(data) // PAGE_SIZE
        at = staging.take(n) if staging is not None else None
        if at is None:
            return await self._put_on_wire(first, seq, data)
        assert staging is not None
        try:
            staging.view[at * PAGE_SIZE : (at + n) * PAGE_SIZE] = data
            statuses = await self.call(PutStaged(first, seq, at, n))
            self.counters.add(LinkCounter.STAGED_PUT_PAGES, n)
            return statuses
        finally:
            # At once, even if the answer never came: a late put reading reused staging
            # stores a version the pager has since written elsewhere and asked to drop.
            staging.give(at, n)

    async def _put_on_wire(self, first: int, seq: int, data: bytes | memoryview) -> bytes:
        """A batch larger than a put may carry on the wire (the store's hello answer says
        how large: it must hold a whole frame before it can act on it) goes as several
        puts of the same version, in one write: still one round trip.  If any part
        fails, the batch fails (the pager then treats it as a put that may land late)."""
        answer = self.hello_answer
        most = answer.max_put_pages if answer is not None else MAX_PUT_PAGES
        n = len(data) // PAGE_SIZE
        if n <= most:
            return await self.call(Put(first, seq, data))
        view = memoryview(data)
        parts = [Put(first + at, seq, view[at * PAGE_SIZE : min(at + most, n) * PAGE_SIZE])
                 for at in range(0, n, most)]
        return b"".join(await self._call_all(parts))

    async def get(self, pages: array) -> GetAnswer:
        return await self.call(Get(pages))

    async def invalidate(self, first: int, count: int, seq: int) -> int:
        return await self.call(Invalidate(first, count, seq))

    def read_shared(self, page: int, seq: int, out: memoryview) -> bool:
        shared = self._shared
        return shared is not None and self.connected and shared.read(page, seq, out)

    async def call(self, message: Request) -> Any:
        return await self._on_endpoint(lambda endpoint: endpoint.request(message))

    async def _call_all(self, messages: list[Request]) -> list[Any]:
        """As :meth:`call`, for several requests in one write (Endpoint.request_all)."""
        return await self._on_endpoint(lambda endpoint: endpoint.request_all(messages))

    async def _on_endpoint(self, send: Callable[[Endpoint], Awaitable[Any]]) -> Any:
        """``send`` on the live connection, its failures as the page store's errors."""
        endpoint = self._endpoint
        if endpoint is None or endpoint.closed.is_set():
            raise StoreUnavailable(f"not connected to {self.address}")
        try:
            return await send(endpoint)
        except PeerGone as exc:
            raise StoreUnavailable(str(exc)) from None
        except RemoteError as exc:
            raise StoreError(str(exc)) from None

    # -- connection upkeep ----------------------------------------------------------------

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

        async with trio.open_nursery() as tasks:
            # Hand-backs run here, not in one connection's nursery: one waiting for a
            # page lock must never hold up a reconnect (the lock's holder may be a
            # read waiting for that very reconnect).
            self.taker.tasks = tasks
            while True:
                try:
                    if await self._serve_link(report_started):
                        backoff = self.backoff_min
                        down_logged = False
                except StoreAuthError as exc:
                    self.counters.add(LinkCounter.CONNECT_FAILURES)
                    self.counters.add(LinkCounter.STORE_AUTH_FAILED)
                    log.error("not using %s: %s; no page was sent", self.address, exc)
                    down_logged = True
                except (StoreUnavailable, StoreError) as exc:
                    self.counters.add(LinkCounter.CONNECT_FAILURES)
                    if not down_logged:
                        log.warning("host store unavailable (%s); retrying in the background", exc)
                        down_logged = True
                except Exception:  # noqa: BLE001 - the connection task must outlive any bug
                    self.counters.add(LinkCounter.ERRORS)
                    log.exception("unexpected error on the host store connection; reconnecting")
                report_started()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    async def _open(self) -> Endpoint:
        with trio.move_on_after(self.connect_timeout):
            try:
                stream = await open_stream(self.address)
            except OSError as exc:
                raise StoreUnavailable(f"cannot connect to {self.address}: {exc.strerror or exc}") from None
            try:
                check_store_peer(stream)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return Endpoint(stream, p.Connection("client"), accept_fds=self.share)
        raise StoreUnavailable(f"cannot connect to {self.address} in {self.connect_timeout}s")

    async def _serve_link(self, on_connected: Callable[[], None]) -> bool:
        """One connection, from connect to loss.  True if it got as far as serving."""
        endpoint = await self._open()
        welcomed = trio.Event()
        failure: Exception | None = None
        served = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, endpoint, welcomed, nursery)
                try:  # caught in the nursery body: raised out of it, it would come wrapped in a group
                    await self._handshake(endpoint, welcomed)
                except (StoreUnavailable, StoreError) as exc:
                    failure = exc
                else:
                    served = True
                    self.counters.add(LinkCounter.CONNECTS)
                    log.info("connected to host store at %s", self.address)
                    self._endpoint = endpoint
                    self._connected.set()
                    on_connected()
                    self.taker.connected(endpoint)
                    nursery.start_soon(self._keep_alive, endpoint)
                    await endpoint.closed.wait()
                    self._disconnected(endpoint)
                    self.counters.add(LinkCounter.DISCONNECTS)
                nursery.cancel_scope.cancel()
        finally:
            self._disconnected(endpoint)
            await endpoint.aclose()
        if failure is not None:
            raise failure
        return served

    async def _keep_alive(self, endpoint: Endpoint) -> None:
        """A small request now and then, so that the store's idle timeout never
        closes a connection that is only quiet (no swapping for a while)."""
        while not endpoint.closed.is_set():
            await trio.sleep(self.keepalive)
            with trio.move_on_after(self.connect_timeout):
                try:
                    await endpoint.request(Stats())
                    self.counters.add(LinkCounter.KEEPALIVES)
                except (PeerGone, RemoteError):
                    pass

    def _disconnected(self, endpoint: Endpoint) -> None:
        if self._endpoint is endpoint:
            self._endpoint = None
            self.taker.connected(None)
            # The store may be gone: its memory is then no longer locked by it, may be
            # swapped out (perhaps to a device we serve), and must not be touched.  A
            # reconnect maps it again.
            if self._shared is not None:
                self._shared.close()
                self._shared = None
        if self._connected.is_set() and not self.connected:
            self._connected = trio.Event()

    async def _handshake(self, endpoint: Endpoint, welcomed: trio.Event) -> None:
        with trio.move_on_after(self.connect_timeout):
            await welcomed.wait()
        welcome = endpoint.conn.welcome
        if welcome is None:
            raise StoreUnavailable(f"no welcome from {self.address} in {self.connect_timeout}s")
        if welcome.auth_required and self.token is None:
            raise StoreError(f"the store at {self.address} needs a token (--token-file)")
        nonce = auth.nonce()
        proof = None
        if self.secret is not None and welcome.instance == self.store_instance:
            proof = auth.reconnect_proof(self.secret, self.name, welcome.nonce, nonce)
        token_proof = None
        if self.token is not None:
            token_proof = auth.token_proof(self.token, "client", self.name, welcome.nonce, nonce)
        hello = Hello(p.PROTOCOL_VERSION, self.name, self.role, self.device_size if self.role == ROLE_PAGER else 0,
                      self.instance, nonce, proof, token_proof, shared=self.share, pool=self.pool)
        answer: HelloAnswer | None = None
        with trio.move_on_after(self.connect_timeout):
            try:
                answer = await endpoint.request(hello)
            except PeerGone as exc:
                raise StoreUnavailable(f"connection lost during hello: {exc}") from None
            except RemoteError as exc:
                self.counters.add(LinkCounter.HELLO_REFUSED)
                raise StoreError(f"hello refused: {exc}") from None
        if answer is None:
            raise StoreUnavailable(f"no hello answer from {self.address} in {self.connect_timeout}s")
        if self.token is not None:
            # Nothing is sent, and nothing it says is believed, until the store has
            # proven it holds the token too.
            expected = auth.token_proof(self.token, "server", self.name, welcome.nonce, nonce)
            if not auth.check(expected, answer.auth):
                endpoint.close()
                raise StoreAuthError("it did not prove it holds our token" if answer.auth is None
                                     else "it proved a different token")
            answer = replace(answer, secret=auth.wrap_secret(self.token, answer.secret, welcome.nonce, nonce))
        if self.role == ROLE_PAGER and answer.pool != self.pool:
            endpoint.close()  # a store older than pools: it would keep (and hand back) our pages as swap
            raise StoreError(f"the store keeps our pages in a {answer.pool} pool, not the {self.pool} one asked for")
        self._welcomed(welcome, answer)
        self._map_shared(answer, endpoint.take_fds())

    def _map_shared(self, answer: HelloAnswer, fds: list[int]) -> None:
        """Map the shared page memory that came with the hello answer, in place of
        any earlier one (a resumed session passes the same memory again; a new
        store instance passes new memory, and the old one is let go)."""
        old, self._shared = self._shared, None
        if old is not None:
            old.close()
        fd = fds.pop(0) if fds and answer.shared is not None else None
        staging_fd = fds.pop(0) if fd is not None and fds and answer.shared.staging else None
        for extra in fds:
            os.close(extra)
        if answer.shared is None:
            return
        if fd is None:
            self.counters.add(LinkCounter.SHARED_UNUSABLE)
            log.warning("the store offered shared page memory but passed no memory: reads go over the wire")
            return
        try:
            self._shared = SharedPages(fd, answer.shared, staging_fd)
        except SharedError as exc:
            self.counters.add(LinkCounter.SHARED_UNUSABLE)
            log.warning("not using the store's shared page memory (%s): reads go over the wire", exc)
            return
        self.counters.add(LinkCounter.SHARED_MAPS)

    def report(self, stats: dict[str, Any]) -> None:
        stats.update(self.counters.as_dict())
        stats["shared_memory"] = self.sharing

    def close(self) -> None:
        """Nothing to release here: the connection ends with :meth:`run`."""

    @property
    def sharing(self) -> bool:
        return self._shared is not None

    def _welcomed(self, welcome: Welcome, answer: HelloAnswer) -> None:
        """Note who answered; if the pages the store held for us are gone, say so
        before anything is served on this connection."""
        if self.store_instance is not None and answer.instance != self.store_instance:
            self.counters.add(LinkCounter.HOST_RESTARTS)
        if self.secret is not None and not answer.resumed:
            self.counters.add(LinkCounter.SESSIONS_LOST)
            self._epoch += 1
            log.error("the host store at %s no longer holds our pages (%s)", self.address,
                      "it is a new instance" if answer.instance != self.store_instance else "it forgot us")
            if self._on_pages_lost is not None:
                self._on_pages_lost()
        self.secret = answer.secret
        self.store_instance = answer.instance
        self.hello_answer = answer

    async def _receive(self, endpoint: Endpoint, welcomed: trio.Event, nursery: trio.Nursery) -> None:
        async def handle(event: p.RequestReceived | p.BadRequest) -> bytes | None:
            if isinstance(event, p.BadRequest) or not isinstance(event.message, HandBack):
                # A store sending requests we do not understand is broken or hostile.
                raise p.ProtocolError(f"store sent a request we do not accept: {event}")
            self.taker.receive(endpoint, event.msgid, event.message, nursery)
            return None

        def on_event(event: p.Event) -> None:
            if isinstance(event, Welcome):
                welcomed.set()

        try:
            await endpoint.receive_loop(handle, on_event)
        except p.ProtocolError as exc:
            self.counters.add(LinkCounter.PROTOCOL_ERRORS)
            log.error("host store broke the protocol, reconnecting: %s", exc)
        except Exception:  # noqa: BLE001 - nothing the store sends may escape
            self.counters.add(LinkCounter.ERRORS)
            log.exception("error on the host store connection, reconnecting")
        finally:
            endpoint.close()

    # -- tools ---------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        return await self.call(Stats())


async def _observe(address: Address, token: bytes | None, timeout: float,
                   body: Callable[[Endpoint], Awaitable[Any]], insecure_tcp: bool = False) -> Any:
    """A fresh observer connection (for tools): the handshake, then ``body`` with the
    endpoint; every way the store can fail becomes StoreUnavailable or StoreError."""
    client = HostClient(address, "vswapctl", 0, role=ROLE_OBSERVER, token=token, connect_timeout=timeout,
                        insecure_tcp=insecure_tcp)
    endpoint = await client._open()
    answer: Any = None
    failure: Exception | None = None
    welcomed = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._receive, endpoint, welcomed, nursery)
            try:  # caught inside the nursery body, so it is not wrapped in an ExceptionGroup
                with trio.fail_after(timeout):
                    await client._handshake(endpoint, welcomed)
                answer = await body(endpoint)
            except trio.TooSlowError:
                failure = StoreUnavailable(f"{address} did not answer in {timeout}s")
            except PeerGone as exc:
                failure = StoreUnavailable(str(exc))
            except RemoteError as exc:
                failure = StoreError(str(exc))
            except (StoreUnavailable, StoreError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    finally:
        await endpoint.aclose()
    if failure is not None:
        raise failure
    return answer


async def query(address: Address, message: Request, timeout: float = 5.0, token: bytes | None = None, *,
                insecure_tcp: bool = False, wait: float | None = None) -> Any:
    """One request on a fresh observer connection (for tools: ``vswapctl stats``).
    ``timeout`` bounds the connection and the handshake, and the answer too unless
    ``wait`` says how long that may take (``math.inf``: as long as it takes)."""

    async def once(endpoint: Endpoint) -> Any:
        limit = timeout if wait is None else wait
        try:
            with trio.fail_after(limit):
                return await endpoint.request(message)
        except trio.TooSlowError:
            raise StoreUnavailable(f"{address} did not answer in {limit:g}s") from None

    return await _observe(address, token, timeout, once, insecure_tcp)


async def follow(address: Address, message: Request, on_answer: Callable[[Any], None], timeout: float = 5.0,
                 token: bytes | None = None, *, insecure_tcp: bool = False) -> None:
    """Send ``message`` again and again on one observer connection, handing each answer
    to ``on_answer`` (for tools that follow the store: ``vswapctl trace``), until
    cancelled; StoreUnavailable or StoreError when the store goes or refuses."""

    async def forever(endpoint: Endpoint) -> None:
        while True:
            with trio.fail_after(timeout + 30):  # a trace read waits up to 30 s for an event
                on_answer(await endpoint.request(message))

    await _observe(address, token, timeout, forever, insecure_tcp)
