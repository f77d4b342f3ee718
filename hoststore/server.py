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
import math
import os
import socket
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import trio

from pagewire import auth
from pagewire import protocol as p
from pagewire.access import Access, before_hello, check_listener, peer_identity, peer_key, peer_uid, socket_mode
from pagewire.address import Address
from . import ephemeral
from .clientpages import ClientPages
from pagewire.causes import DropCause
from pagewire.endpoint import Endpoint, FrameTimeout, InFlight, Lent, PeerGone, RemoteError
from .fairshare import FairShare
from vswapcommon.logsetup import RateLimited
from .pools import Pool, Pools, first_pool
from pagewire.messages import (
    Configure,
    Drain,
    Evict,
    Get,
    HandBack,
    HandBackCause,
    Hello,
    Invalidate,
    MessageError,
    Put,
    PutStaged,
    Stats,
    TraceRead,
    Welcome,
)
from .hostcounters import HostCounter
from .handback import DROP_CHUNK, HandBackEngine, Pace
from .store import RequestError, Store, get_answer

log = logging.getLogger("hoststore")
# Lines a peer can cause by connecting, one per connection: rate-limited.
peer_log = RateLimited(log)

SERVER_NAME = "hoststore"
ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


async def open_listener(address: Address, access: Access | None = None) -> trio.SocketListener:
    """Bind one listener.  A unix socket file left by a dead daemon is replaced;
    one a live daemon answers on is an error.  TCP without a token only as
    ``access.insecure_tcp`` accepts it (AccessError otherwise)."""
    access = access or Access()
    if address.kind == "tcp":
        check_listener(address, access)
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
    os.chmod(path, socket_mode(access))  # others may connect only if --allow-uid lets some in
    sock.listen(128)
    return trio.SocketListener(sock)


def listener_address(listener: trio.SocketListener) -> Address:
    sock = listener.socket
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Address("unix", path=name)
    return Address("tcp", host=name[0], port=name[1])


@dataclass(frozen=True)
class ServerConfig:
    handback_batch: int = 256  # pages per hand-back request
    handback_rate: float = 25600.0  # pages per second under pressure (100 MiB/s)
    handback_timeout: float = 30.0  # a client that does not answer in time keeps its pages, for now
    handback_interval: float = 0.05  # how often pressure is checked for hand-back
    # A drain waits for a client while it takes its pages back at an average of at least
    # handback_batch pages (1 MiB) per drain_timeout: each page taken back adds
    # drain_timeout / handback_batch seconds to its deadline, which is never more than
    # drain_timeout ahead; it starts at the drain's start plus drain_timeout, and once, on the
    # client's first return during the drain, at that return plus drain_timeout.  Pages it
    # answers FAILED (or does not answer) earn nothing: so a drain lasts at most 2 * drain_timeout
    # plus drain_timeout for each handback_batch pages of the client holding most.
    drain_timeout: float = 60.0
    drain_window: int = 4  # hand-back requests in flight per client while draining
    handback_rest: float = 5.0  # a client that took nothing back is left alone this long under pressure
    # Connections by pool (hoststore.pools); a pool not named here has its default.
    max_connections: Mapping[Pool, int] = field(default_factory=lambda: MappingProxyType({}))
    max_connections_per_peer: int = 64  # per uid (unix socket) or host (TCP; loopback is one)
    hello_timeout: float = 3.0  # from connect to an answered hello
    idle_timeout: float = 300.0  # no complete message for this long: closed (clients keep alive)
    connection_rate: float = 50.0  # new connections per second per peer (burst: twice that)
    frame_timeout: float = 5.0  # waiting for the rest of a frame begun, at most this long in all
    max_in_flight: int = 4 << 20  # bytes held for peers (frames begun, answers not taken), per pool
    # Past max_in_flight, only a connection whose peer kept the store waiting this long is closed.
    shed_after: float = 0.5


# What serving any one request costs, in pages' worth of the store's time
# (parsing, dispatch, framing: about what copying 16 pages costs).
REQUEST_COST = 16


def request_cost(msg: Any) -> int:
    """A request's charge to its connection's fair share (see FairShare)."""
    if isinstance(msg, Put | PutStaged):
        return REQUEST_COST + msg.n
    if isinstance(msg, Get):
        return REQUEST_COST + len(msg.pages)
    return REQUEST_COST


def counted_as(uid: int | None, peer: str) -> str:
    """Whom a new connection counts against for the per-peer limits: a unix-socket peer
    its uid (``peer``) from the start, a TCP peer its host's connections not past hello."""
    return peer if uid is not None else before_hello(peer)


class _Stopped(Exception):
    """This connection was closed from outside (its client reconnected on another, or a
    limit closed it): serve nothing more on it."""


class Session:
    """One connection: its protocol state, and the client it serves once the hello is done."""

    def __init__(self, server: "Server", stream: trio.abc.Stream, peer: str | None = None) -> None:
        """``peer``: whom it counts against for the per-peer limits once it is past its hello
        (pagewire.access.peer_key); ``counted``: whom it counts against now."""
        self.server = server
        self.store = server.store
        self.access = server.access
        cfg = server.config
        self.uid = peer_uid(stream)
        inflight = server.inflight[first_pool(self.uid, self.access)]  # moves with it (_leave_hello_pool)
        self.endpoint = Endpoint(stream, p.Connection("server"), pace=self._pace,
                                 inflight=inflight, frame_timeout=cfg.frame_timeout,
                                 on_shed=self._shed)
        self.nonce = auth.nonce()
        self.peer = peer or peer_key(stream)
        self.counted = counted_as(self.uid, self.peer)
        self.took_token = False  # from self.counted's bucket, as it connected
        self.admin = self.access.is_admin(self.uid)
        self.identity = peer_identity(self.uid, self.access.token)  # who owns the names it creates
        self.client: ClientPages | None = None
        self.stopped = False
        self.hello_done = False
        self._scope: trio.CancelScope | None = None
        self._deadline: trio.CancelScope | None = None

    async def run(self) -> None:
        store, cfg = self.store, self.server.config
        store.counters.add(HostCounter.CONNECTIONS)
        store.connections_active += 1
        try:
            with trio.CancelScope() as self._scope:
                if self.stopped:
                    return
                welcome = Welcome(p.PROTOCOL_VERSION, SERVER_NAME, store.instance, self.nonce,
                                  auth_required=self.access.token is not None)
                with trio.CancelScope(deadline=trio.current_time() + cfg.hello_timeout) as self._deadline:
                    await self.endpoint.send(self.endpoint.conn.send_welcome(welcome))
                    await self.endpoint.receive_loop(self._handle, on_progress=self._progress,
                                                     on_wait=self._waiting)
                if self._deadline.cancelled_caught:
                    established = self.hello_done
                    store.counters.add(HostCounter.CLOSED_IDLE if established else HostCounter.CLOSED_HELLO_TIMEOUT)
                    peer_log("timeout", logging.INFO, "closing a connection%s: %s", self._who(),
                             f"nothing received for {cfg.idle_timeout:g}s" if established
                             else f"no hello in {cfg.hello_timeout:g}s")
        except p.FrameTooLarge as exc:
            store.counters.add(HostCounter.PROTOCOL_ERRORS)
            store.counters.add(HostCounter.CLOSED_OVERSIZED)
            peer_log("oversized", logging.WARNING, "closing a connection%s: %s", self._who(), exc)
        except p.ProtocolError as exc:
            store.counters.add(HostCounter.PROTOCOL_ERRORS)
            peer_log("protocol", logging.WARNING, "closing a connection%s: %s", self._who(), exc)
        except FrameTimeout as exc:
            store.counters.add(HostCounter.CLOSED_FRAME_TIMEOUT)
            peer_log("frame timeout", logging.INFO, "closing a connection%s from %s: %s", self._who(), self.peer,
                     exc)
        except (PeerGone, _Stopped):
            pass
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the listener
            store.counters.add(HostCounter.CONNECTION_ERRORS)
            peer_log("error", logging.ERROR, "closing a connection%s after an error", self._who(), exc_info=True)
        finally:
            self.server.fair.forget(self)
            store.trace.forget(self)
            if self.client is not None:
                store.detach(self.client, self)
                self.server.client_changed()
            store.connections_active -= 1
            await self.endpoint.aclose()

    async def _pace(self, nbytes: int) -> None:
        """Before each slice of a large answer: sending is the store's time too, so it
        takes turns like serving does; then, about to wait for the peer to read, this
        connection stops holding the others' turns."""
        try:
            await self.server.fair.turn(self, nbytes // p.PAGE_SIZE)
        finally:
            self.server.fair.idle(self)

    def _waiting(self) -> None:
        """Waiting for the peer: this connection must not hold the others' turns."""
        self.server.fair.idle(self)

    def _progress(self) -> None:
        """A complete message came: once the hello is done, the idle clock starts over
        (moved at most once a second, or a quarter of the timeout: a stream of small
        requests need not pay for it)."""
        if self._deadline is not None and self.hello_done:
            idle = self.server.config.idle_timeout
            deadline = trio.current_time() + idle
            if deadline - self._deadline.deadline >= min(1.0, idle / 4):
                self._deadline.deadline = deadline

    @property
    def _can_share(self) -> bool:
        """Shared page memory only for a unix-socket peer that is root or the store's own
        user: it could stop or trace the store anyway.  A peer let in with --allow-uid
        keeps to the wire: a client holding the store's memfds can make the store fault
        on pages of its choosing (punch, rewrite, page out), stalling everyone."""
        return self.admin

    def _who(self) -> str:
        return f" of client {self.client.name!r}" if self.client is not None else ""

    def stop(self) -> None:
        """Serve nothing more here, at once: the client reconnected elsewhere, or a limit
        closes this connection (whoever calls this counts why)."""
        self.stopped = True
        self.endpoint.close()
        if self._scope is not None:
            self._scope.cancel()

    def evict(self) -> None:
        """The pool of connections not past their hello is full: this, its oldest, goes."""
        peer_log("hello pool", logging.WARNING, "closing a connection from %s that has not said hello, for a "
                 "newer one: %d such connections already (--max-connections hello=N)", self.peer,
                 self.server.pools.limits[Pool.HELLO])
        self.stop()

    def _shed(self) -> None:
        """Closed by its pool's in-flight cap (InFlight): its peer kept the store waiting longest."""
        self.store.counters.add(HostCounter.CLOSED_IN_FLIGHT)
        peer_log("in flight", logging.WARNING, "closing a connection%s from %s: what the store holds for the "
                 "peers of its pool passed --max-in-flight, and this one has kept it waiting longest (over "
                 "%gs, for the rest of a message, or to take answers)", self._who(), self.peer,
                 self.server.config.shed_after)
        self.stop()

    # -- requests ---------------------------------------------------------------------

    async def _handle(self, event: p.RequestReceived | p.BadRequest) -> bytes | None:
        if self.stopped:
            raise _Stopped()
        conn = self.endpoint.conn
        if isinstance(event, p.BadRequest):
            if not conn.established:  # a bad hello: refused, and the connection closes
                self.store.counters.add(HostCounter.HELLO_REFUSED)
                return conn.refuse_hello(event.msgid, event.reason)
            await self.server.fair.turn(self, REQUEST_COST)
            self.store.counters.add(HostCounter.BAD_REQUESTS)
            return conn.send_error(event.msgid, event.reason)
        msg = event.message
        if isinstance(msg, Hello):
            answer = self._hello(event.msgid, msg)
            shared = self.client.shared if self.client is not None and self.hello_done else None
            if shared is None or not self._can_share:
                return answer
            # The memfd rides on the answer's bytes: nothing is queued before a hello's answer.
            await self.endpoint.send(answer, fds=shared.fds)
            return None
        if not isinstance(msg, Invalidate):  # charged by the slice, as it goes
            await self.server.fair.turn(self, request_cost(msg))
        try:
            if isinstance(msg, Get) and self.client is not None:
                return await self._get(event.msgid, msg, self.client)
            answer = await self._serve(msg)
        except RequestError as exc:
            self.store.counters.add(HostCounter.BAD_REQUESTS)
            return conn.send_error(event.msgid, str(exc))
        await trio.lowlevel.checkpoint()  # let other connections in between requests
        return conn.send_answer(event.msgid, msg, answer)

    def _refuse(self, msgid: int, hello: Hello, cause: HostCounter | None, reason: str) -> bytes:
        self.store.counters.add(HostCounter.HELLO_REFUSED)
        if cause is not None:
            self.store.counters.add(cause)
        peer_log("hello refused", logging.INFO, "hello from %r refused: %s", hello.client, reason)
        return self.endpoint.conn.refuse_hello(msgid, reason)

    def _authenticate(self, hello: Hello) -> tuple[HostCounter, str] | None:
        """Why this peer may not say hello at all, or None."""
        if self.uid is not None and not self.access.uid_allowed(self.uid):
            return HostCounter.REFUSED_UID, f"uid {self.uid} may not use this store (see hoststore --allow-uid)"
        token = self.access.token
        if token is not None:
            expected = auth.token_proof(token, "client", hello.client, self.nonce, hello.nonce)
            if not auth.check(expected, hello.auth):
                return HostCounter.REFUSED_AUTH, ("authentication failed: this store needs the token of its "
                                                  "--token-file" if hello.auth is None else
                                                  "authentication failed: wrong token")
        return None

    def _leave_hello_pool(self) -> tuple[HostCounter | None, str] | None:
        """A TCP peer's hello is good: it moves to the tcp pool, if that has room
        (counted there if not) and its host is within its own limits (apart from
        the connections not past hello); why not, or None."""
        server = self.server
        pools = server.pools
        if pools.pool_of(self) is not Pool.HELLO or self.uid is not None:
            return None
        refusal = server.past_hello(self)
        if refusal is not None:
            return refusal
        if pools.join(self, Pool.TCP):
            self.endpoint.move(server.inflight[Pool.TCP])
            return None
        return None, (f"the store has {pools.limits[Pool.TCP]} TCP connections already "
                      f"(hoststore --max-connections tcp=N)")

    def _hello(self, msgid: int, hello: Hello) -> bytes:
        conn = self.endpoint.conn
        refusal = self._authenticate(hello)
        if refusal is not None:
            return self._refuse(msgid, hello, *refusal)
        full = self._leave_hello_pool()
        if full is not None:
            return self._refuse(msgid, hello, *full)
        try:
            client, answer, superseded = self.store.attach(hello, self.nonce, can_share=self._can_share,
                                                           owner=self.identity)
        except RequestError as exc:
            return self._refuse(msgid, hello, None, str(exc))
        if isinstance(superseded, Session):
            log.info("client %r reconnected: closing its old connection", hello.client)
            superseded.stop()
        if client is not None:
            self.store.bind(client, self)
            self.client = client
            self.server.drain_returned(client)
            self.server.client_changed()
        log.info("hello from %s %r (%s)", hello.role, hello.client, "resumed" if answer.resumed else "new")
        answer = replace(answer, admin=self.admin)
        token = self.access.token
        if token is not None:
            answer = replace(answer, secret=auth.wrap_secret(token, answer.secret, self.nonce, hello.nonce),
                             auth=auth.token_proof(token, "server", hello.client, self.nonce, hello.nonce))
        self.hello_done = True
        if self._deadline is not None:
            self._deadline.deadline = trio.current_time() + self.server.config.idle_timeout
        return conn.accept_hello(msgid, answer)

    async def _get(self, msgid: int, msg: Get, client: ClientPages) -> bytes | Lent | bytearray | memoryview:
        """A get answered from a frame filled in place: one copy of the pages, not
        three; a large one in a pooled buffer (no page faults, no heap growth)."""
        conn, pool = self.endpoint.conn, self.server.frames
        n = len(msg.pages)
        if not p.IN_PLACE:  # a big-endian host: the generic path
            return conn.send_answer(msgid, msg, await get_answer(self.store, client, msg.pages))
        buf = pool.take() if p.get_answer_size(n) >= p.OWN_MAPPING_BYTES else None
        try:
            frame = p.get_answer_frame(msgid, n, buf)
            assert frame is not None
            await self.store.get(client, msg.pages, frame.statuses, frame.seqs, frame.data)
            await trio.lowlevel.checkpoint()
            data = conn.send_get_answer(frame)
        except BaseException:
            if buf is not None:
                pool.give(buf)
            raise
        return data if buf is None else Lent(data, lambda: pool.give(buf))

    async def _serve(self, msg: Any) -> Any:
        store = self.store
        if isinstance(msg, Stats):
            return store.stats(self.client, admin=self.admin)
        if isinstance(msg, Drain):
            if not self.admin:
                raise RequestError("drain needs an admin connection (root or the store's own user)")
            if self._deadline is not None:
                self._deadline.deadline = math.inf  # a drain may take longer than the idle timeout
            # Waiting for the drain is not waiting for the store's time: this connection
            # must not hold the others' turns (they have hand-backs to answer).
            self.server.fair.idle(self)
            return await self.server.drain()
        if isinstance(msg, Evict):
            if not self.admin:
                raise RequestError("evict needs an admin connection (root or the store's own user, on the unix "
                                   "socket)")
            dropped = store.evict(msg.client, msg.force)
            self.server.client_changed()  # a drain may have been waiting for that client
            return {"client": msg.client, "dropped": dropped}
        if isinstance(msg, TraceRead):
            if not self.admin:
                raise RequestError("the trace needs an admin connection (root or the store's own user)")
            return await self._trace_read(msg)
        if isinstance(msg, Configure):
            if not self.admin:
                raise RequestError("configure needs an admin connection (root or the store's own user)")
            return store.configure(msg)
        client = self.client
        if client is None:
            raise RequestError(f"{msg.method!r} needs a pager connection")
        if isinstance(msg, Put | PutStaged):
            if isinstance(msg, PutStaged):
                statuses = await store.put_staged(client, msg.first, msg.seq, msg.at, msg.n)
            else:
                statuses = await store.put(client, msg.first, msg.seq, msg.data)
            delay = store.policy.delay
            if delay:  # a slow or distant host, as the policy asks: this connection waits, no other
                self.server.fair.idle(self)
                await trio.sleep(delay)
            return statuses
        if isinstance(msg, Get):
            return await get_answer(store, client, msg.pages)
        if isinstance(msg, Invalidate):
            return await self._invalidate(client, msg)
        raise RequestError(f"{msg.method!r} is not served here")

    async def _trace_read(self, msg: TraceRead) -> dict[str, Any]:
        """Events since the last read; waiting for one holds up only this connection."""
        reader = self.store.trace.reader(self, msg.sample)
        if not reader.events and msg.wait:
            self.server.fair.idle(self)
            if self._deadline is not None:
                self._deadline.deadline = max(self._deadline.deadline, trio.current_time() + msg.wait + 1)
            with trio.move_on_after(msg.wait):
                await reader.arrived.wait()
        events, dropped = reader.take(msg.max_events)
        return {"events": events, "dropped": dropped}

    async def _invalidate(self, client: ClientPages, msg: Invalidate) -> int:
        """The stored pages of the range are dropped in slices, each charged to this
        connection's fair share, so that one client's huge invalidate cannot hold
        the store for everyone else.  The work follows the pages stored in the
        range, not its length: a 4 TiB range with nothing stored is one step."""
        await self.server.fair.turn(self, REQUEST_COST)

        async def pace(pages: int) -> None:
            await trio.sleep(0)  # other connections in between two slices
            await self.server.fair.turn(self, pages)

        return await self.store.invalidate(client, msg.first, msg.count, msg.seq, pace=pace)

    async def hand_back(self, handback: HandBack, timeout: float) -> bytes:
        """Ask the client to take pages back; its per-page answer.  Counted in flight
        against the hand-backs' own budget, not the pool's: the store chose to send it."""
        with trio.fail_after(timeout):
            return await self.endpoint.request(handback, budget=self.server.handbacks)


class Server:
    """The store behind its listeners, with the hand-back and drain machinery."""

    def __init__(self, store: Store, config: ServerConfig | None = None, access: Access | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.access = access or Access()
        self.fair = FairShare(on_wait=lambda: store.counters.add(HostCounter.FAIR_WAITS))
        self.frames = p.FramePool()
        self.pools = Pools(self.config.max_connections, store.counters)
        # What each pool's peers can make the store hold: TCP cannot crowd out admin or unix.
        self.inflight = {pool: InFlight(self.config.max_in_flight, self.config.shed_after) for pool in Pool}
        # The store's own hand-backs while their peers take them: a budget of their own.
        self.handbacks = InFlight(self.config.max_in_flight, self.config.shed_after)
        self._per_peer: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when)
        self._changed = trio.Event()
        cfg = self.config
        self.handback = HandBackEngine(
            store, self._ask, can_ask=lambda client: isinstance(client.session, Session),
            refused=(PeerGone, RemoteError, trio.TooSlowError, MessageError),
            pace=Pace(cfg.handback_batch, cfg.handback_rate, cfg.handback_interval, cfg.handback_rest))
        self._drain_started = False
        self._drain_done = trio.Event()
        self._drain_deadlines: dict[str, float] = {}  # client name -> when the drain gives up on it
        self._drain_returned: set[str] = set()  # clients that came back during the drain (once is credited)
        self.drain_report: dict[str, Any] | None = None
        self._nursery: trio.Nursery | None = None

    def client_changed(self) -> None:
        """A client connected or left: wake whoever waits for that (the drain)."""
        self._changed.set()
        self._changed = trio.Event()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept, and close at once (synchronously, no task) what a limit refuses:
        a peer opening connections as fast as it can costs us an accept and a close."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_RESOURCE_ERRORS:  # out of descriptors or memory: wait, go on
                    peer_log("accept", logging.ERROR, "accept failed (%s); pausing 0.1s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            try:
                session = self._admit_connection(stream)
            except Exception:  # noqa: BLE001
                peer_log("setup error", logging.ERROR, "error admitting a connection", exc_info=True)
                session = None
            if session is None:
                stream.socket.close()
                continue
            nursery.start_soon(self._handle_session, session)

    async def _handle_session(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - never let a connection reach the accept loop
            peer_log("setup error", logging.ERROR, "error setting up a connection", exc_info=True)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(session.endpoint.stream)
        finally:
            self.pools.leave(session)
            self._uncount(session.counted)

    def _uncount(self, key: str) -> None:
        self._per_peer[key] -= 1
        if not self._per_peer[key]:
            del self._per_peer[key]

    def _over_limits(self, key: str, pool: Pool) -> tuple[HostCounter, str] | bool:
        """Whether a new connection of ``key``, joining ``pool``, is past its connection
        rate or count: the counter and the reason, or, if not, whether it took a token.
        A TCP connection not past hello is let in over its rate while the hello pool
        has room (so that a flood from its host cannot keep a token holder there out),
        taking no token and evicting no one."""
        cfg = self.config
        took = self._take_token(key)
        if not took and (pool is not Pool.HELLO or self.pools.full(pool)):
            return HostCounter.REFUSED_CONNECTION_RATE, f"more than {cfg.connection_rate:g} new connections a second"
        if self._per_peer[key] >= cfg.max_connections_per_peer:
            return (HostCounter.REFUSED_PEER_CONNECTIONS,
                    f"it has {self._per_peer[key]} already (--max-connections-per-peer)")
        return took

    def past_hello(self, session: Session) -> tuple[HostCounter, str] | None:
        """A TCP connection's hello is good: it counts against its host from now on, within
        the host's own rate and count (why not, or None), and gives back the token its
        connecting took from its host's connections not past hello."""
        over = self._over_limits(session.peer, Pool.TCP)
        if not isinstance(over, bool):
            return over[0], f"{session.peer}: {over[1]}"
        if session.took_token:
            self._refund(session.counted)
        self._uncount(session.counted)
        session.counted = session.peer
        self._per_peer[session.counted] += 1
        return None

    def _admit_connection(self, stream: trio.SocketStream) -> Session | None:
        """The session of a new connection, in its pool; None if a limit closes it."""
        uid, peer = peer_uid(stream), peer_key(stream)
        key, pool = counted_as(uid, peer), first_pool(uid, self.access)
        over = self._over_limits(key, pool)
        if not isinstance(over, bool):  # refused before anything is set up for it
            self.store.counters.add(over[0])
            peer_log(over[0].value, logging.WARNING, "closing a connection from %s: %s", key, over[1])
            return None
        session = Session(self, stream, peer)
        session.took_token = over
        if not self.pools.join(session, pool):
            peer_log("max connections", logging.WARNING,
                     "closing a connection from %s: the %s pool is full (--max-connections %s=%d)", key, pool,
                     pool, self.pools.limits[pool])
            return None
        self._per_peer[key] += 1
        return session

    def _take_token(self, key: str) -> bool:
        """A token bucket per peer: reconnecting is cheap for a client, and a peer
        opening connections as fast as it can gets no more than its rate of our time."""
        rate = self.config.connection_rate
        burst = 2 * rate
        now = trio.current_time()
        tokens, when = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - when) * rate)
        if len(self._buckets) > 4096:  # many peers: forget those whose bucket is full again
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * rate < burst}
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def _refund(self, key: str) -> None:
        """Give back a token ``_take_token`` took from ``key``."""
        if key in self._buckets:
            tokens, when = self._buckets[key]
            self._buckets[key] = (min(2 * self.config.connection_rate, tokens + 1), when)

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, or until a drain has finished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            nursery.start_soon(self.handback.under_pressure)
            for inflight in (*self.inflight.values(), self.handbacks):
                nursery.start_soon(inflight.watch)
            bound = [listener_address(lst) for lst in listeners]
            log.info("listening on %s; capacity %d pages", ", ".join(map(str, bound)),
                     self.store.limits.capacity_pages)
            task_status.started(bound)
            await self._drain_done.wait()
            await trio.sleep(0.2)  # let the drain's requester get its answer out
            nursery.cancel_scope.cancel()

    # -- hand-back --------------------------------------------------------------------

    async def hand_back(self, client: ClientPages, cause: HandBackCause, limit: int) -> int:
        """Hand up to ``limit`` of the client's pages back over its connection (the engine:
        ``hoststore.handback``); pages freed."""
        return await self.handback.hand_back(client, cause, limit)

    async def _ask(self, client: ClientPages, handback: HandBack) -> bytes:
        session = client.session
        if not isinstance(session, Session):  # it went while its pages were picked (a tier's lend waits)
            raise PeerGone(f"client {client.name!r} has no connection now")
        return await session.hand_back(handback, self.config.handback_timeout)

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
        """Hand every client its pages back, for as long as it keeps up the drain's
        minimum rate (``ServerConfig.drain_timeout``; ``drain_progress``): a slow backing
        disk slows the drain down, down to that rate; a client that answers FAILED, or
        nothing, is given up on."""
        store = self.store
        store.draining = True
        dropped = 0
        while got := ephemeral.drop_lru(store, DROP_CHUNK, DropCause.DRAIN):  # nothing to hand back
            dropped += got
            await trio.lowlevel.checkpoint()
        if dropped:
            log.info("draining: dropped the %d pages of ephemeral pools (clean: nothing is lost)", dropped)
        start = trio.current_time()
        self._drain_deadlines = {name: start + self.config.drain_timeout for name in store.clients}
        before = {name: c[HostCounter.HANDED_BACK_DRAIN] for name, c in store.client_counters.items()}
        log.info("draining: refusing new pages, handing %d pages of %d client(s) back", store.pages,
                 sum(1 for c in store.clients.values() if c.count))
        workers: dict[str, trio.CancelScope] = {}
        given_up: set[str] = set()
        try:
            async with trio.open_nursery() as nursery:
                while (deadline := self._drain_round(nursery, workers, given_up)) < math.inf:
                    changed = self._changed
                    with trio.move_on_at(deadline):
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
                client = store.clients[name]
                why = (f"connected, but it took its pages back at less than {self.config.handback_batch} per "
                       f"{self.config.drain_timeout:g}s" if client.connected
                       else f"away, and not back to take them within {self.config.drain_timeout:g}s")
                log.error("DRAIN INCOMPLETE: client %r (%s) still has %s here; they are lost when the store exits",
                          name, why, fmt_pages(n))
            if not held:
                log.info("drain complete: every page was handed back")
            self._drain_done.set()

    def _drain_round(self, nursery: trio.Nursery, workers: dict[str, trio.CancelScope], given_up: set[str]
                     ) -> float:
        """One look at every client holding pages: start handing back to those that are
        connected, give up on those past their deadline (``drain_progress``; their
        hand-backs in flight are cancelled, their pages stay), and return when the next
        one would time out (infinity: nobody left to wait for, the drain is over)."""
        store, timeout = self.store, self.config.drain_timeout
        now = trio.current_time()
        next_deadline = math.inf
        for client in list(store.clients.values()):
            name = client.name
            if not client.count:
                continue
            deadline = self._drain_deadlines.setdefault(name, now + timeout)
            if now >= deadline:
                scope = workers.pop(name, None)
                if scope is not None:
                    scope.cancel()
                if name not in given_up:
                    given_up.add(name)
                    store.counters.add(HostCounter.DRAIN_GAVE_UP)
                    log.warning("drain: giving up on client %r: it took pages back at less than %d per %gs, "
                                "%s still here", name, self.config.handback_batch, timeout, fmt_pages(client.count))
                continue
            given_up.discard(name)
            next_deadline = min(next_deadline, deadline)
            if client.connected and name not in workers:
                scope = workers[name] = trio.CancelScope()
                nursery.start_soon(self._drain_client, client, scope, workers)
        return next_deadline

    def drain_progress(self, client: ClientPages, freed: int) -> None:
        """While draining, the client took ``freed`` pages back: each moves its deadline
        ``drain_timeout / handback_batch`` seconds on, to at most ``drain_timeout`` from
        now.  So only a rate counts: one page taken per batch offered, the rest FAILED,
        earns a 256th of what a whole batch does."""
        if not self.store.draining:
            return
        cfg, now = self.config, trio.current_time()
        deadline = self._drain_deadlines.get(client.name, now + cfg.drain_timeout)
        credit = freed * cfg.drain_timeout / cfg.handback_batch
        self._drain_deadlines[client.name] = min(now + cfg.drain_timeout, deadline + credit)

    def drain_returned(self, client: ClientPages) -> None:
        """While draining, the client came back: ``drain_timeout`` from now to take its pages,
        the first time only (reconnecting over and over earns nothing)."""
        if self.store.draining and client.name not in self._drain_returned:
            self._drain_returned.add(client.name)
            now = trio.current_time()
            old = self._drain_deadlines.get(client.name, now)
            self._drain_deadlines[client.name] = max(old, now + self.config.drain_timeout)

    async def _drain_client(self, client: ClientPages, scope: trio.CancelScope,
                            workers: dict[str, trio.CancelScope]) -> None:
        """Hand one client's pages back with a few requests in flight, until it holds
        none, its connection goes (it is picked up again when it reconnects), or the
        drain gives up on it (``scope`` is cancelled)."""
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(self.config.drain_window):
                        nursery.start_soon(self._drain_worker, client)
        finally:
            if workers.get(client.name) is scope:
                del workers[client.name]
            self.client_changed()

    async def _drain_worker(self, client: ClientPages) -> None:
        backoff = 0.05
        while client.connected and client.count:
            if client.count == client.lent_count:  # the other workers have the rest in flight
                await self.handback.returned()
                continue
            freed = await self.hand_back(client, HandBackCause.DRAIN, self.config.handback_batch)
            if freed:
                self.drain_progress(client, freed)
                backoff = 0.05
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def dropped_now(self) -> dict[str, int]:
        """What an immediate exit would lose, by client."""
        return self.store.held()


def fmt_pages(n: int) -> str:
    return f"{n} pages ({n * p.PAGE_SIZE / (1 << 20):.1f} MiB)" if n else "no pages"

