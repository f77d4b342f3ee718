"""trio listeners, one :class:`Session` per connection, hand-back and drain.

A session serves its connection's requests in order, synchronously against
the :class:`~hoststore.store.Store`, and yields between them.  Whatever goes
wrong while serving one connection closes that connection only, and is
counted: no peer can take the store (and every other client's pages) down.

Pages leave the store towards their client in two cases, by one path
(:meth:`Server.hand_back`): under memory pressure, the least recently used
pages at a bounded rate; and on a drain (SIGTERM, SIGINT, ``vswapctl drain``),
every page.  The store frees a page only once its client has answered that it
took it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, replace
from typing import Any

import trio

from . import auth
from . import protocol as p
from .address import Address
from .clientpages import ClientPages
from .endpoint import Endpoint, PeerGone, RemoteError
from .messages import (
    Drain,
    Get,
    HandBack,
    HandBackCause,
    Hello,
    Invalidate,
    MessageError,
    Put,
    Stats,
    Welcome,
)
from .store import HostCounter, RequestError, Store

log = logging.getLogger("hoststore")

SERVER_NAME = "hoststore"
INVALIDATE_SLICE = 1 << 16  # pages dropped between two yields to other connections


async def open_listener(address: Address) -> trio.SocketListener:
    """Bind one listener.  A unix socket file left by a dead daemon is replaced;
    one a live daemon answers on is an error."""
    if address.kind == "tcp":
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
        return listeners[0]
    path = address.path
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a daemon that is gone
        else:
            raise OSError(errno.EADDRINUSE, f"a daemon already listens on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # pages are private: only the owner may connect
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return trio.SocketListener(sock)


def listener_address(listener: trio.SocketListener) -> Address:
    sock = listener.socket
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Address("unix", path=name)
    return Address("tcp", host=name[0], port=name[1])


def peer_uid(stream: trio.abc.Stream) -> int | None:
    """The uid of a unix-socket peer (SO_PEERCRED), None for TCP."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


@dataclass(frozen=True)
class ServerConfig:
    handback_batch: int = 256  # pages per hand-back request
    handback_rate: float = 25600.0  # pages per second under pressure (100 MiB/s)
    handback_timeout: float = 30.0  # a client that does not answer in time keeps its pages, for now
    handback_interval: float = 0.05  # how often pressure is checked for hand-back
    drain_timeout: float = 60.0  # how long a drain waits for clients that are not connected
    drain_window: int = 4  # hand-back requests in flight per client while draining
    handback_rest: float = 5.0  # a client that took nothing back is left alone this long under pressure


class _Superseded(Exception):
    """This connection's client reconnected on another: stop serving this one."""


class Session:
    """One connection: its protocol state, and the client it serves once the hello is done."""

    def __init__(self, server: "Server", stream: trio.abc.Stream) -> None:
        self.server = server
        self.store = server.store
        self.endpoint = Endpoint(stream, p.Connection("server"))
        self.nonce = auth.nonce()
        uid = peer_uid(stream)
        self.admin = uid is not None and uid in (0, os.geteuid())
        self.client: ClientPages | None = None
        self.superseded = False
        self._scope: trio.CancelScope | None = None

    async def run(self) -> None:
        store = self.store
        store.counters.add(HostCounter.CONNECTIONS)
        store.connections_active += 1
        try:
            with trio.CancelScope() as self._scope:
                if self.superseded:
                    return
                welcome = Welcome(p.PROTOCOL_VERSION, SERVER_NAME, store.instance, self.nonce)
                await self.endpoint.send(self.endpoint.conn.send_welcome(welcome))
                await self.endpoint.receive_loop(self._handle)
        except p.ProtocolError as exc:
            store.counters.add(HostCounter.PROTOCOL_ERRORS)
            log.warning("closing a connection%s: %s", self._who(), exc)
        except (PeerGone, _Superseded):
            pass
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the listener
            store.counters.add(HostCounter.CONNECTION_ERRORS)
            log.exception("closing a connection%s after an error", self._who())
        finally:
            if self.client is not None:
                store.detach(self.client, self)
                self.server.client_changed()
            store.connections_active -= 1
            await self.endpoint.aclose()

    def _who(self) -> str:
        return f" of client {self.client.name!r}" if self.client is not None else ""

    def supersede(self) -> None:
        """The client reconnected elsewhere: serve nothing more here, at once."""
        self.superseded = True
        self.endpoint.close()
        if self._scope is not None:
            self._scope.cancel()

    # -- requests ---------------------------------------------------------------------

    async def _handle(self, event: p.RequestReceived | p.BadRequest) -> bytes | None:
        if self.superseded:
            raise _Superseded()
        conn = self.endpoint.conn
        if isinstance(event, p.BadRequest):
            if not conn.established:  # a bad hello: refused, and the connection closes
                self.store.counters.add(HostCounter.HELLO_REFUSED)
                return conn.refuse_hello(event.msgid, event.reason)
            self.store.counters.add(HostCounter.BAD_REQUESTS)
            return conn.send_error(event.msgid, event.reason)
        msg = event.message
        if isinstance(msg, Hello):
            return self._hello(event.msgid, msg)
        try:
            answer = await self._serve(msg)
        except RequestError as exc:
            self.store.counters.add(HostCounter.BAD_REQUESTS)
            return conn.send_error(event.msgid, str(exc))
        await trio.lowlevel.checkpoint()  # let other connections in between requests
        return conn.send_answer(event.msgid, msg, answer)

    def _hello(self, msgid: int, hello: Hello) -> bytes:
        conn = self.endpoint.conn
        try:
            client, answer, superseded = self.store.attach(hello, self.nonce)
        except RequestError as exc:
            self.store.counters.add(HostCounter.HELLO_REFUSED)
            log.info("hello from %r refused: %s", hello.client, exc)
            return conn.refuse_hello(msgid, str(exc))
        if isinstance(superseded, Session):
            log.info("client %r reconnected: closing its old connection", hello.client)
            superseded.supersede()
        if client is not None:
            self.store.bind(client, self)
            self.client = client
            self.server.client_changed()
        log.info("hello from %s %r (%s)", hello.role, hello.client, "resumed" if answer.resumed else "new")
        return conn.accept_hello(msgid, replace(answer, admin=self.admin))

    async def _serve(self, msg: Any) -> Any:
        store = self.store
        if isinstance(msg, Stats):
            return store.stats(self.client, admin=self.admin)
        if isinstance(msg, Drain):
            if not self.admin:
                raise RequestError("drain needs an admin connection (root or the store's own user)")
            return await self.server.drain()
        client = self.client
        if client is None:
            raise RequestError(f"{msg.method!r} needs a pager connection")
        if isinstance(msg, Put):
            return store.put(client, msg)
        if isinstance(msg, Get):
            return store.get(client, msg)
        if isinstance(msg, Invalidate):
            return await self._invalidate(client, msg)
        raise RequestError(f"{msg.method!r} is not served here")

    async def _invalidate(self, client: ClientPages, msg: Invalidate) -> int:
        """A long range is dropped in slices, yielding in between, so that one
        client's huge invalidate cannot hold the store for everyone else."""
        dropped = 0
        end = msg.first + msg.count
        if end > client.npages:
            raise RequestError(f"pages {msg.first}..{end - 1} outside the device's {client.npages} pages")
        for first in range(msg.first, end, INVALIDATE_SLICE):
            part = Invalidate(first, min(INVALIDATE_SLICE, end - first), msg.seq)
            dropped += self.store.invalidate(client, part)
            if end - first > INVALIDATE_SLICE:
                await trio.sleep(0)
        return dropped

    async def hand_back(self, handback: HandBack, timeout: float) -> bytes:
        """Ask the client to take pages back; its per-page answer."""
        with trio.fail_after(timeout):
            return await self.endpoint.request(handback)


class Server:
    """The store behind its listeners, with the hand-back and drain machinery."""

    def __init__(self, store: Store, config: ServerConfig | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self._changed = trio.Event()
        self._drain_started = False
        self._drain_done = trio.Event()
        self.drain_report: dict[str, Any] | None = None
        self._nursery: trio.Nursery | None = None

    def client_changed(self) -> None:
        """A client connected or left: wake whoever waits for that (the drain)."""
        self._changed.set()
        self._changed = trio.Event()

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        try:
            await Session(self, stream).run()
        except Exception:  # noqa: BLE001 - never let a connection reach serve_listeners
            log.exception("error setting up a connection")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, or until a drain has finished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
            nursery.start_soon(self._pressure_loop)
            bound = [listener_address(lst) for lst in listeners]
            log.info("listening on %s; capacity %d pages", ", ".join(map(str, bound)),
                     self.store.limits.capacity_pages)
            task_status.started(bound)
            await self._drain_done.wait()
            await trio.sleep(0.2)  # let the drain's requester get its answer out
            nursery.cancel_scope.cancel()

    # -- hand-back --------------------------------------------------------------------

    async def hand_back(self, client: ClientPages, cause: HandBackCause, limit: int) -> int:
        """Lend up to ``limit`` of the client's oldest pages, hand them back, settle
        with the answer.  Pages freed; pages without an answer stay stored."""
        session = client.session
        if not isinstance(session, Session):
            return 0
        store = self.store
        try:
            handback = store.lend(client, cause, limit)
        except Exception:  # noqa: BLE001 - a bug here must not take every client's pages down
            store.counters.add(HostCounter.HANDBACK_ERRORS)
            log.exception("could not pick pages of client %r to hand back", client.name)
            return 0
        if handback is None:
            return 0
        try:
            statuses = await session.hand_back(handback, self.config.handback_timeout)
            return store.settle(client, handback, statuses)
        except (PeerGone, RemoteError, trio.TooSlowError, MessageError) as exc:
            log.warning("client %r did not take %d pages back (%s): they stay here",
                        client.name, len(handback.pages), str(exc) or type(exc).__name__)
        except Exception:  # noqa: BLE001
            store.counters.add(HostCounter.HANDBACK_ERRORS)
            log.exception("error handing %d pages back to client %r: they stay here",
                          len(handback.pages), client.name)
        finally:
            store.unlend(client, handback)  # whatever is still lent (no answer, or an error) stays stored
        return 0

    async def _pressure_loop(self) -> None:
        """While the host is under pressure (hysteresis: from the high watermark down
        to the low one), hand the least recently used pages back at a bounded rate.
        Each client has at most one hand-back in flight, so a client that is slow to
        answer (or never does) holds up only itself; one that failed rests a while."""
        cfg = self.config
        per_round = max(1, int(cfg.handback_rate * cfg.handback_interval))
        busy: set[str] = set()
        resting: dict[str, float] = {}

        async def one(client: ClientPages, limit: int) -> None:
            try:
                if not await self.hand_back(client, HandBackCause.PRESSURE, limit):
                    resting[client.name] = trio.current_time() + cfg.handback_rest
            finally:
                busy.discard(client.name)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(cfg.handback_interval)
                try:
                    store = self.store
                    if store.draining or not store.pages or not store.update_pressure():
                        continue
                    budget, now = per_round, trio.current_time()
                    for client in store.handback_order():
                        if budget <= 0:
                            break
                        if client.name in busy or resting.get(client.name, 0.0) > now:
                            continue
                        limit = min(budget, cfg.handback_batch)
                        budget -= limit
                        busy.add(client.name)
                        nursery.start_soon(one, client, limit)
                except Exception:  # noqa: BLE001
                    self.store.counters.add(HostCounter.HANDBACK_ERRORS)
                    log.exception("error in the pressure hand-back loop; going on")

    # -- drain ------------------------------------------------------------------------

    async def drain(self) -> dict[str, Any]:
        """Stop admitting, hand every page back, and report; the server then stops.
        Concurrent callers share one drain."""
        if not self._drain_started:
            self._drain_started = True
            assert self._nursery is not None
            self._nursery.start_soon(self._drain)
        await self._drain_done.wait()
        assert self.drain_report is not None
        return self.drain_report

    async def _drain(self) -> None:
        store = self.store
        store.draining = True
        before = {name: c[HostCounter.HANDED_BACK_DRAIN] for name, c in store.client_counters.items()}
        log.info("draining: refusing new pages, handing %d pages of %d client(s) back", store.pages,
                 sum(1 for c in store.clients.values() if c.count))
        active: set[str] = set()
        try:
            with trio.move_on_after(self.config.drain_timeout):
                async with trio.open_nursery() as nursery:
                    while store.pages:
                        for client in list(store.clients.values()):
                            if client.connected and client.count and client.name not in active:
                                active.add(client.name)
                                nursery.start_soon(self._drain_client, client, active)
                        changed = self._changed
                        with trio.move_on_after(0.5):
                            await changed.wait()
                    nursery.cancel_scope.cancel()
        except Exception:  # noqa: BLE001 - the report, and the exit, must still come
            store.counters.add(HostCounter.HANDBACK_ERRORS)
            log.exception("error while draining")
        finally:
            held = store.held()
            handed = {name: c[HostCounter.HANDED_BACK_DRAIN] - before.get(name, 0)
                      for name, c in store.client_counters.items()}
            self.drain_report = {"handed_back": {k: v for k, v in handed.items() if v or k in held},
                                 "dropped": held}
            for name, n in held.items():
                log.error("DRAIN INCOMPLETE: client %r still has %s here; they are lost when the store exits",
                          name, fmt_pages(n))
            if not held:
                log.info("drain complete: every page was handed back")
            self._drain_done.set()

    async def _drain_client(self, client: ClientPages, active: set[str]) -> None:
        """Hand one client's pages back with a few requests in flight, until it holds
        none or its connection goes (it is picked up again when it reconnects)."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.drain_window):
                    nursery.start_soon(self._drain_worker, client)
        finally:
            active.discard(client.name)
            self.client_changed()

    async def _drain_worker(self, client: ClientPages) -> None:
        backoff = 0.05
        while client.connected and client.count:
            if client.count == client.lent_count:
                await trio.sleep(0.01)  # the other workers have the rest in flight
                continue
            freed = await self.hand_back(client, HandBackCause.DRAIN, self.config.handback_batch)
            if freed:
                backoff = 0.05
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def dropped_now(self) -> dict[str, int]:
        """What an immediate exit would lose, by client."""
        return self.store.held()


def fmt_pages(n: int) -> str:
    return f"{n} pages ({n * p.PAGE_SIZE / (1 << 20):.1f} MiB)" if n else "no pages"

