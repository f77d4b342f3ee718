"""A store's clients: who they are, who owns each name, and who is connected.

A client is a name with pages (:class:`~hoststore.clientpages.ClientPages`).
The registry decides who may attach under a name (the identity that created
it, proven again at each reconnect), when an away client's name and pages may
go (``away_timeout``, an admin's ``evict``), and how many names a store keeps
(``max_clients``).  Pages themselves are the store's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from pagewire import auth
from pagewire.messages import POOL_EPHEMERAL, ROLE_PAGER, Hello, HelloAnswer, SharedLayout
from vswapcommon.counters import Counters

from .backend import PageBackend
from .clientpages import ClientPages
from .hostcounters import HostCounter
from .policy import Limits
from .trace import Trace

log = logging.getLogger("hoststore")

DEFAULT_AWAY_TIMEOUT = 300.0
DEFAULT_MAX_CLIENTS = 1024


class RequestError(Exception):
    """A request the store will not serve (answered with an error; the connection stays)."""


def _layout(client: ClientPages) -> SharedLayout | None:
    shared = client.shared
    return None if shared is None else shared.layout


class Holder(Protocol):
    """What the registry needs of the store whose clients it keeps (``hoststore.store.Store``)."""

    limits: Limits
    instance: str
    pages: int
    counters: Counters[HostCounter]
    trace: Trace
    backend: PageBackend

    def count(self, client: ClientPages, cause: HostCounter, n: int = 1) -> None: ...


COMPRESSED_ROOM = 16  # a client's pages kept compressed: slots for this many times the capacity


class ClientRegistry:
    def __init__(self, store: Holder, *, away_timeout: float = DEFAULT_AWAY_TIMEOUT,
                 max_clients: int = DEFAULT_MAX_CLIENTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.away_timeout = away_timeout
        self.max_clients = max_clients
        self.clock = clock
        self.clients: dict[str, ClientPages] = {}
        self.client_counters: dict[str, Counters[HostCounter]] = {}
        self.owners: dict[str, str] = {}  # client name -> the identity that created it (access.peer_identity)

    def attach(self, hello: Hello, server_nonce: bytes, can_share: bool = False, *, owner: str
               ) -> tuple[ClientPages | None, HelloAnswer, object | None]:
        """Admit a hello from a peer of identity ``owner`` (``access.peer_identity``;
        ``access.IN_PROCESS`` for a store inside its one client's process):
        (the client's pages, the answer, a connection this one supersedes).

        A name belongs to the identity that created it: another identity is refused,
        whatever the client holds and however long it has been away (only an admin's
        ``evict`` frees it).  So a squatter can neither drop an owner's pages nor hold
        its name against the owner's reconnect.  A reconnect that proves it is the
        instance holding the client's secret keeps the pages (and replaces a connection
        the store still thinks is up).  ``can_share``: the connection can pass a memfd,
        so a new client that asks for shared page memory gets it.  A new instance of
        the owner replaces the old one under the rules of :meth:`_replace`; a new name
        needs room under ``max_clients`` (:meth:`_make_room`).
        """
        can_share = can_share and self.store.backend.shares_memory  # a tier keeps no page here to share
        if hello.role != ROLE_PAGER:
            return None, HelloAnswer(self.store.instance, False, auth.new_secret(), admin=True), None
        if hello.device_size > self.store.limits.max_device_size:
            raise RequestError(f"device size {hello.device_size} is above this store's limit of "
                               f"{self.store.limits.max_device_size} bytes (--max-device-size)")
        old = self.clients.get(hello.client)
        if old is None:
            self._make_room(owner)
        else:
            self._check_owner(old, owner)
            if self._proves_reconnect(old, hello, server_nonce):
                if old.pool != hello.pool:
                    raise RequestError(f"client {old.name!r} holds a {old.pool} pool: the same instance "
                                       f"cannot come back as a {hello.pool} one")
                return self._resume(old, can_share)
            self._replace(old)
        client = self._new_client(hello, owner, can_share)
        answer = HelloAnswer(self.store.instance, False, client.secret, shared=_layout(client), pool=client.pool)
        return client, answer, None

    def _check_owner(self, client: ClientPages, owner: str) -> None:
        """Refuse ``owner`` the name of ``client`` unless it created it."""
        if self.owners[client.name] != owner:
            self.store.counters.add(HostCounter.REFUSED_NAME_OWNER)
            raise RequestError(f"client name {client.name!r} belongs to {self.owners[client.name]}, not to "
                               f"{owner}: no other identity may take it over (an admin can free it: vswapctl evict)")

    @staticmethod
    def _proves_reconnect(client: ClientPages, hello: Hello, server_nonce: bytes) -> bool:
        """The hello comes from the instance holding ``client``'s secret (for this connection's nonces)."""
        return client.instance == hello.instance and client.npages == hello.npages and auth.check(
            auth.reconnect_proof(client.secret, client.name, server_nonce, hello.nonce), hello.proof)

    def _resume(self, client: ClientPages, can_share: bool) -> tuple[ClientPages, HelloAnswer, object | None]:
        """The client's own reconnect: its pages, and the connection it supersedes (if the store thought it up)."""
        superseded = client.session
        if superseded is not None:
            self.store.counters.add(HostCounter.TAKEOVERS)
        shared = _layout(client) if can_share else None  # its memfds cannot travel on this connection
        answer = HelloAnswer(self.store.instance, True, client.secret, shared=shared, pool=client.pool)
        return client, answer, superseded

    def _replace(self, old: ClientPages) -> None:
        """A new instance of the owner under ``old``'s name: refused while ``old`` is
        connected, and while it is away with pages for less than ``away_timeout`` (its
        owner may be on its way back).  After that, or if it holds no pages, ``old``
        goes with its pages."""
        name = old.name
        if old.connected:
            raise RequestError(f"client name {name!r} is in use by another connection")
        away = self.away_seconds(old) or 0.0
        if old.count and away < self.away_timeout:
            raise RequestError(
                f"client name {name!r} belongs to a client that is away with {old.count} pages; it has "
                f"{self.away_timeout - away:.0f}s left to come back for them (--away-timeout)"
            )
        log.warning("client %r came back as a new instance: dropping the %d pages of the old one", name, old.count)
        self.store.count(old, HostCounter.DROPPED_SESSIONS, old.count)
        self.store.pages -= self.store.backend.close_client(old)

    def _make_room(self, owner: str) -> None:
        """Room for a new name of ``owner`` under ``max_clients``.  Names that are away
        and hold no page cost memory and nothing else, so ``owner``'s own are forgotten
        (with their counters) to make it: a peer inventing names pushes out its own.
        Never another identity's: its owner may come back for the name, and a name
        forgotten is a name anyone may claim.  So the names held stay at most
        ``max_clients``, and beyond them a new one is refused (``refused_clients``)
        until their owners reuse them or an admin evicts some."""
        if len(self.clients) < self.max_clients:
            return
        for name in [n for n, c in self.clients.items() if self.owners[n] == owner and not c.connected
                     and not c.count]:
            self._remove(name)
        if len(self.clients) >= self.max_clients:
            self.store.counters.add(HostCounter.REFUSED_CLIENTS)
            raise RequestError(f"this store keeps {len(self.clients)} client names already (--max-clients), none "
                               f"of them yours to forget; an admin can free names that are away (vswapctl evict)")

    def _new_client(self, hello: Hello, owner: str, can_share: bool) -> ClientPages:
        """A new client under ``hello``'s name, owned by ``owner``; away until bound to a connection."""
        name = hello.client
        # Slot numbers are uint32 in the shared index (slot + 1): a store that large shares nothing.
        # Room for the capacity, or 4 GiB if that is more (the capacity may grow at run
        # time; unused slots cost address space only); kept compressed, for 16 times as
        # many pages (a client past that has its pages refused, nomem).
        room = self.store.limits.capacity_pages * (COMPRESSED_ROOM if self.store.compressor.codec else 1)
        bound = min(hello.npages, max(room, 1 << 20))
        slots = bound if can_share and hello.shared else 0
        slots = slots if slots < (1 << 32) - 1 else 0
        client = self.store.backend.new_client(name, hello.npages, hello.instance, slots, bound)
        client.ephemeral = hello.pool == POOL_EPHEMERAL
        client.away_since = self.clock()
        self.clients[name] = client
        self.client_counters[name] = Counters(HostCounter)
        self.owners[name] = owner
        return client

    def away_seconds(self, client: ClientPages) -> float | None:
        """How long ``client`` has been without a connection; None while it has one."""
        if client.connected or client.away_since is None:
            return None
        return self.clock() - client.away_since

    def _remove(self, name: str) -> int:
        """Forget client ``name``: its pages, counters and owner go.  Returns the pages it held."""
        dropped = self.store.backend.close_client(self.clients.pop(name))
        self.store.pages -= dropped
        self.client_counters.pop(name, None)
        self.owners.pop(name, None)
        return dropped

    def evict(self, name: str, force: bool = False) -> int:
        """An admin's request: drop the pages of client ``name``, which is away, and
        forget it, so that its name is free for anyone.  A connected client is
        refused: its pages are in use, and it could take them back instead (a drain,
        or its own shutdown).  So is, unless ``force``, one away for less than
        ``away_timeout``: it may be reconnecting (its link just dropped, a backoff),
        and its processes would get SIGBUS for every page dropped.  Returns the
        pages dropped."""
        client = self.clients.get(name)
        if client is None:
            raise RequestError(f"no client named {name!r} here")
        if client.connected:
            raise RequestError(f"client {name!r} is connected: its pages are in use, and evict drops only the "
                               f"pages of a client that is away (stop that client first)")
        away = self.away_seconds(client) or 0.0
        if not force and away < self.away_timeout:
            raise RequestError(f"client {name!r} has been away for {away:.0f}s only, less than --away-timeout "
                               f"({self.away_timeout:g}s): it may be on its way back, and its processes would "
                               f"get SIGBUS for each of its {client.count} pages dropped; wait, or use --force")
        owner = self.owners[name]
        dropped = self._remove(name)
        self.store.counters.add(HostCounter.EVICT_REQUESTS)
        self.store.counters.add(HostCounter.EVICTED, dropped)
        log.warning("client %r (of %s, away for %.0fs) evicted by an admin%s: %d pages dropped, its name is free",
                    name, owner, away, " (forced)" if force else "", dropped)
        if self.store.trace.active:
            self.store.trace.emit("evict", client=name, pages=dropped)
        return dropped

    def bind(self, client: ClientPages, session: object) -> None:
        client.session = session
        client.away_since = None
        if client.shared is not None:
            client.shared.keep_staging_resident()

    def detach(self, client: ClientPages, session: object) -> None:
        if client.session is session:
            client.session = None
            client.away_since = self.clock()
            if client.shared is not None:
                client.shared.release_staging()

    def held(self) -> dict[str, int]:
        """Pages held per client (for the drain report)."""
        return {c.name: c.count for c in self.clients.values() if c.count}
