"""All clients' pages, the admission state and the counters.

Each client's pages live in its own :class:`~hoststore.clientpages.ClientPages`;
the store decides what to admit (``hoststore.policy``), keeps counters by cause,
and lends pages out to be handed back.  Everything here is synchronous and
in memory: the server calls it between reads of the socket.

Sequence numbers keep late requests harmless: a put older than the stored
version of a page is refused, and an invalidate drops only versions not newer
than its own.  Requests of one connection are served in order, and a
reconnect supersedes the old connection before anything else is served, so
a request sent before another is never applied after it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from array import array
from collections.abc import Callable, Iterator
from types import MappingProxyType

from pagewire import auth
from .clientpages import NIL, ClientPages
from .hostcounters import HANDBACK_COUNTER, REFUSAL_COUNTER, HostCounter
from vswapcommon.counters import Counters
from vswapcommon.logsetup import OUTPUT
from pagewire.messages import (
    PAGE_SIZE,
    Configure,
    Get,
    GetAnswer,
    HandBack,
    HandBackCause,
    Hello,
    HelloAnswer,
    Invalidate,
    PageStatus,
    Put,
    PutStaged,
    TakeStatus,
    ROLE_PAGER,
    SharedLayout,
)
from .policies import DecisionContext, Policy, PolicyError, Pressure, parse_policy
from .policy import ClientTerms, Limits, admit, share, under_pressure
from .pressure import Sampler, Snapshot
from .slab import SlabFull
from .trace import Trace

log = logging.getLogger("hoststore")


def _layout(client: ClientPages) -> SharedLayout | None:
    shared = client.shared
    return None if shared is None else shared.layout


@dataclasses.dataclass
class PutPlan:
    """A put's decisions: a status per page, and which pages were recorded as stored."""

    msg: Put
    out: bytearray
    snapshot: Snapshot
    accepted: list[int] = dataclasses.field(default_factory=list)  # batch indices recorded as stored
    replaced: list[int] = dataclasses.field(default_factory=list)  # of those, over an older version


class RequestError(Exception):
    """A request the store will not serve (answered with an error; the connection stays)."""


DEFAULT_AWAY_TIMEOUT = 300.0
DEFAULT_MAX_CLIENTS = 1024


class Store:
    def __init__(self, limits: Limits, sampler: Sampler, *, away_timeout: float = DEFAULT_AWAY_TIMEOUT,
                 max_clients: int = DEFAULT_MAX_CLIENTS, clock: Callable[[], float] = time.monotonic,
                 policy: Policy | None = None) -> None:
        self.limits = limits
        self.policy: Policy = policy or Pressure()
        self.trace = Trace()
        self.max_clients = max_clients
        self.sampler = sampler
        # What keeps this store from serving reliably under machine-wide memory pressure
        # (its memory not locked, its reclaim not kept from doing I/O), as the daemon found it.
        self.pressure_risks: list[str] = []
        self.away_timeout = away_timeout
        self.clock = clock
        self.clients: dict[str, ClientPages] = {}
        self.client_counters: dict[str, Counters[HostCounter]] = {}
        self.owners: dict[str, str] = {}  # client name -> the identity that created it (access.peer_identity)
        self.counters: Counters[HostCounter] = Counters(HostCounter)
        self.instance = secrets.token_hex(8)
        self.pressure = False
        self.draining = False
        self.pages = 0  # all clients together
        self.connections_active = 0
        self._stamp = 0

    # -- clients --------------------------------------------------------------------

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
        if hello.role != ROLE_PAGER:
            return None, HelloAnswer(self.instance, False, auth.new_secret(), admin=True), None
        if hello.device_size > self.limits.max_device_size:
            raise RequestError(f"device size {hello.device_size} is above this store's limit of "
                               f"{self.limits.max_device_size} bytes (--max-device-size)")
        old = self.clients.get(hello.client)
        if old is None:
            self._make_room(owner)
        else:
            self._check_owner(old, owner)
            if self._proves_reconnect(old, hello, server_nonce):
                return self._resume(old, can_share)
            self._replace(old)
        client = self._new_client(hello, owner, can_share)
        return client, HelloAnswer(self.instance, False, client.secret, shared=_layout(client)), None

    def _check_owner(self, client: ClientPages, owner: str) -> None:
        """Refuse ``owner`` the name of ``client`` unless it created it."""
        if self.owners[client.name] != owner:
            self.counters.add(HostCounter.REFUSED_NAME_OWNER)
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
            self.counters.add(HostCounter.TAKEOVERS)
        shared = _layout(client) if can_share else None  # its memfds cannot travel on this connection
        return client, HelloAnswer(self.instance, True, client.secret, shared=shared), superseded

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
        self._count(old, HostCounter.DROPPED_SESSIONS, old.count)
        self.pages -= self.close_client(old)

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
            self.counters.add(HostCounter.REFUSED_CLIENTS)
            raise RequestError(f"this store keeps {len(self.clients)} client names already (--max-clients), none "
                               f"of them yours to forget; an admin can free names that are away (vswapctl evict)")

    def _new_client(self, hello: Hello, owner: str, can_share: bool) -> ClientPages:
        """A new client under ``hello``'s name, owned by ``owner``; away until bound to a connection."""
        name = hello.client
        # Slot numbers are uint32 in the shared index (slot + 1): a store that large shares nothing.
        # Room for the capacity, or 4 GiB if that is more (the capacity may grow at run
        # time; unused slots cost address space only).
        slots = min(hello.npages, max(self.limits.capacity_pages, 1 << 20)) if can_share and hello.shared else 0
        slots = slots if slots < (1 << 32) - 1 else 0
        client = self.new_client(name, hello.npages, hello.instance, slots)
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
        dropped = self.close_client(self.clients.pop(name))
        self.pages -= dropped
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
        self.counters.add(HostCounter.EVICT_REQUESTS)
        self.counters.add(HostCounter.EVICTED, dropped)
        log.warning("client %r (of %s, away for %.0fs) evicted by an admin%s: %d pages dropped, its name is free",
                    name, owner, away, " (forced)" if force else "", dropped)
        if self.trace.active:
            self.trace.emit("evict", client=name, pages=dropped)
        return dropped

    def new_client(self, name: str, npages: int, instance: str, shared_slots: int) -> ClientPages:
        return ClientPages(name, npages, instance, auth.new_secret(), shared_slots=shared_slots)

    def close_client(self, client: ClientPages) -> int:
        """A client is done with: its pages go.  Returns how many it held."""
        return client.close()

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

    def _count(self, client: ClientPages, cause: HostCounter, n: int = 1) -> None:
        self.counters.add(cause, n)
        self.client_counters[client.name].add(cause, n)

    def _next_stamp(self) -> int:
        self._stamp += 1
        return self._stamp

    # -- pages ----------------------------------------------------------------------

    def put(self, client: ClientPages, msg: Put) -> bytes:
        """Offer a batch; one status per page.  A refused page's older stored copy is dropped."""
        return self.finish_put(client, self.admit_put(client, msg, msg.data))

    def admit_put(self, client: ClientPages, msg: Put, data: bytes | memoryview | None) -> PutPlan:
        """Decide each page of a put and record the accepted ones (with ``data``, or
        their versions only when ``data`` is None: a page tier holds the data)."""
        first, n, seq = msg.first, msg.n, msg.seq
        self._check_range(client, first, n)
        self.counters.add(HostCounter.PUT_REQUESTS)
        snapshot = self.sampler.get()
        self.pressure = under_pressure(snapshot, self.limits, self.pressure)
        stamp = self._next_stamp()
        plan = PutPlan(msg, bytearray(n), snapshot)
        out = plan.out
        view = memoryview(data) if data is not None else None
        index, seq_of, limits = client.index, client.seq_of, self.limits
        terms = self.terms(client)
        verdict = self.policy.decide(DecisionContext(
            client.name, first, n, snapshot, self.pages, limits.capacity_pages, client.count, terms.quota_pages,
            terms.share_pages, self.pressure))
        for i in range(n):
            page = first + i
            slot = index.get(page)
            if slot != NIL and seq <= seq_of[slot]:
                out[i] = PageStatus.REFUSED_OUTDATED
                self._count(client, HostCounter.REFUSED_OUTDATED)
                continue
            if self.draining:
                status = PageStatus.REFUSED_DRAINING
            elif verdict is not None and verdict[i] != PageStatus.STORED:
                status = PageStatus(verdict[i])
            else:
                status = admit(limits, False, self.pages, client.count, slot != NIL, terms)
            page_data = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] if view is not None else None
            if status == PageStatus.STORED:
                if slot != NIL:
                    client.replace(slot, seq, page_data, stamp)
                    plan.replaced.append(i)
                    plan.accepted.append(i)
                    continue
                try:
                    client.add(page, seq, page_data, stamp)
                except SlabFull as exc:
                    status = PageStatus.REFUSED_NOMEM
                    log.warning("cannot map memory for a page (%s): refusing with reason nomem", exc)
                else:
                    self.pages += 1
                    plan.accepted.append(i)
                    continue
            self.refuse(client, plan, i, status)
        return plan

    def refuse(self, client: ClientPages, plan: PutPlan, i: int, status: PageStatus) -> None:
        """Page ``i`` of the plan is refused; an older stored copy must not outlive the refusal, and goes."""
        plan.out[i] = status
        self._count(client, REFUSAL_COUNTER[status])
        slot = client.index.get(plan.msg.first + i)
        if slot != NIL:  # never stale: the old version must not outlive a refused new one
            self.drop(client, slot)
            self._count(client, HostCounter.STALE_DROPPED)

    def drop(self, client: ClientPages, slot: int) -> None:
        """Forget one stored page."""
        client.remove(slot)
        self.pages -= 1

    def finish_put(self, client: ClientPages, plan: PutPlan) -> bytes:
        """Count what a put stored, and trace it."""
        out = plan.out
        accepted = sum(1 for i in plan.accepted if out[i] == PageStatus.STORED)
        replaced = sum(1 for i in plan.replaced if out[i] == PageStatus.STORED)
        if accepted:
            self._count(client, HostCounter.ACCEPTED, accepted)
        if replaced:
            self._count(client, HostCounter.REPLACED, replaced)
        if self.trace.active:
            msg = plan.msg
            refused = {PageStatus(s).name.lower().removeprefix("refused_"): out.count(s) for s in set(out) if s}
            self.trace.emit("put", client=client.name, first=msg.first, pages=msg.n,
                            stored=msg.n - sum(refused.values()), refused=refused,
                            used_percent=plan.snapshot.used_percent, policy=self.policy.spec)
        return bytes(out)

    def put_staged(self, client: ClientPages, msg: PutStaged) -> bytes:
        """A put whose pages are in the client's staging memory."""
        shared = client.shared
        if shared is None:
            raise RequestError("put_staged needs shared memory, which this client does not have")
        try:
            view = shared.staged(msg.at, msg.n)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        with view:
            return self.put(client, Put(msg.first, msg.seq, view))

    def get(self, client: ClientPages, msg: Get) -> GetAnswer:
        """Status, version and data of each page asked for (zeros where missing)."""
        n = len(msg.pages)
        status = bytearray(n)
        seqs = array("Q", bytes(8 * n))
        data = bytearray(n * PAGE_SIZE)
        self.get_into(client, msg, status, memoryview(seqs), memoryview(data))
        return GetAnswer(bytes(status), seqs, data)

    def get_into(self, client: ClientPages, msg: Get, status: bytearray | memoryview, seqs: memoryview,
                 data: bytearray | memoryview) -> None:
        """As :meth:`get`, written into the caller's zeroed buffers (an answer frame)."""
        pages = msg.pages
        n = len(pages)
        if max(pages) >= client.npages:
            raise RequestError(f"get asks for pages outside the device's {client.npages} pages")
        self.counters.add(HostCounter.GET_REQUESTS)
        stamp = self._next_stamp()
        index, slab, seq_of = client.index, client.slab, client.seq_of
        hits = 0
        for i, page in enumerate(pages):
            slot = index.get(page)
            if slot == NIL:
                status[i] = PageStatus.MISSING
                continue
            data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = slab.view(slot)
            seqs[i] = seq_of[slot]
            client.touch(slot, stamp)
            hits += 1
        self._count(client, HostCounter.READS, hits)
        if hits < n:
            self._count(client, HostCounter.MISSES, n - hits)

    def invalidate(self, client: ClientPages, msg: Invalidate) -> int:
        """Drop stored pages in the range whose version is not newer than ``msg.seq``."""
        self._check_range(client, msg.first, msg.count)
        self.counters.add(HostCounter.INVALIDATE_REQUESTS)
        return self.invalidate_pages(client, self.stored_pages(client, msg.first, msg.count), msg.seq)

    def stored_pages(self, client: ClientPages, first: int, count: int) -> list[int]:
        """The client's stored pages in ``first .. first + count`` (work follows what is stored)."""
        self._check_range(client, first, count)
        return [page for page, _ in client.index.stored_in(first, count)]

    def invalidate_pages(self, client: ClientPages, pages: list[int], seq: int) -> int:
        """Drop those of ``pages`` still stored whose version is not newer than ``seq``.
        Pages may have left since the list was made (a hand-back, between two slices)."""
        dropped = 0
        seq_of = client.seq_of
        for page in pages:
            slot = client.index.get(page)  # slots move as pages leave: look each one up again
            if slot != NIL and seq_of[slot] <= seq:
                self.drop(client, slot)
                dropped += 1
        self._count(client, HostCounter.INVALIDATED, dropped)
        if self.trace.active and dropped:
            self.trace.emit("invalidate", client=client.name, pages=dropped)
        return dropped

    @staticmethod
    def _check_range(client: ClientPages, first: int, count: int) -> None:
        if first + count > client.npages:
            raise RequestError(f"pages {first}..{first + count - 1} outside the device's {client.npages} pages")

    # -- hand-back ------------------------------------------------------------------

    # The server's entry points for pages.  Here they are served at once; a store
    # whose page data is in a tier elsewhere waits for it (hoststore.tieredstore).
    in_place_get = True  # get answers may be written straight into a frame (get_into)

    async def put_async(self, client: ClientPages, msg: Put | PutStaged) -> bytes:
        return self.put_staged(client, msg) if isinstance(msg, PutStaged) else self.put(client, msg)

    async def get_async(self, client: ClientPages, msg: Get) -> GetAnswer:
        return self.get(client, msg)

    async def lend_async(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None:
        return self.lend(client, cause, limit)

    def lend(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None:
        """The client's least recently used pages, to be handed back; None if it has none to lend."""
        pages, seqs, data = client.lend_oldest(limit)
        if not pages:
            return None
        self.counters.add(HostCounter.HANDBACK_REQUESTS)
        return HandBack(cause, pages, seqs, data)

    def settle(self, client: ClientPages, handback: HandBack, statuses: bytes) -> int:
        """Apply a hand-back answer: free what the client took or no longer needs, keep
        the rest.  A page rewritten meanwhile is no longer lent and stays.  Returns pages freed."""
        freed = not_needed = failed = 0
        for page, seq, status in zip(handback.pages, handback.seqs, statuses, strict=True):
            slot = client.lent_slot(page, seq)
            if slot == NIL:
                continue
            if status == TakeStatus.FAILED:
                client.unlend(slot)
                failed += 1
                continue
            self.drop(client, slot)
            freed += 1
            not_needed += status == TakeStatus.NOT_NEEDED
        self._count(client, HANDBACK_COUNTER[HandBackCause(handback.cause)], freed)
        if self.trace.active:
            self.trace.emit("handback", client=client.name, cause=str(handback.cause), pages=len(handback.pages),
                            freed=freed, not_needed=not_needed, failed=failed)
        if not_needed:
            self._count(client, HostCounter.HANDBACK_NOT_NEEDED, not_needed)
        if failed:
            self._count(client, HostCounter.HANDBACK_FAILED, failed)
        return freed

    def unlend(self, client: ClientPages, handback: HandBack) -> None:
        """No answer came (connection lost, timeout): every page still lent stays stored."""
        for page, seq in zip(handback.pages, handback.seqs, strict=True):
            slot = client.lent_slot(page, seq)
            if slot != NIL:
                client.unlend(slot)

    def update_pressure(self) -> bool:
        self.pressure = under_pressure(self.sampler.get(), self.limits, self.pressure)
        return self.pressure

    def terms(self, client: ClientPages) -> ClientTerms:
        """The client's quota, and its weighted share of the capacity among the
        clients that count now: connected (a newcomer gets the reserve kept near
        capacity), or holding pages.  Names away with nothing take no share."""
        limits = self.limits
        total = sum(limits.weight_of(c.name) for c in self.clients.values() if c.connected or c.count)
        if not (client.connected or client.count):
            total += limits.weight_of(client.name)
        return ClientTerms(limits.quota_of(client.name),
                           share(limits.capacity_pages, limits.weight_of(client.name), total))

    def handback_order(self) -> Iterator[ClientPages]:
        """Connected clients holding pages, in the order pressure should take from them:
        clients above their quota first, then by how far they are above their weighted
        share, then the one whose oldest page is oldest."""
        candidates = [c for c in self.clients.values() if c.connected and c.count > c.lent_count]

        def key(c: ClientPages) -> tuple[int, int, int]:
            terms = self.terms(c)
            over_quota = terms.quota_pages is not None and c.count > terms.quota_pages
            return (0 if over_quota else 1, -max(0, c.count - terms.share_pages), c.oldest_stamp or 0)

        return iter(sorted(candidates, key=key))

    # -- reporting ------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """Pages held per client (for the drain report)."""
        return {c.name: c.count for c in self.clients.values() if c.count}

    def client_stats(self, client: ClientPages) -> dict[str, object]:
        terms = self.terms(client)
        stats: dict[str, object] = {
            "pages": client.count,
            "quota_pages": terms.quota_pages,
            "weight": self.limits.weight_of(client.name),
            "share_pages": terms.share_pages,
            "device_pages": client.npages,
            "connected": client.connected,
            "away_seconds": None if (away := self.away_seconds(client)) is None else round(away, 1),
            "lent": client.lent_count,
            "slab_bytes_mapped": client.slab.mapped_bytes,
            "index_bytes": client.index.nbytes,
            "shared_memory": client.shared is not None,
        }
        stats.update(self.client_counters[client.name].as_dict())
        return stats

    def configure(self, msg: Configure) -> dict[str, object]:
        """Change the policy and limits now (an admin's request); all or nothing."""
        policy, limits = self.policy, self.limits
        try:
            if msg.policy is not None:
                policy = parse_policy(msg.policy, psi_available=lambda: self.sampler.get().psi_some_avg10 is not None)
            changes: dict[str, object] = {}
            if msg.capacity is not None:
                if msg.capacity % PAGE_SIZE:
                    raise ValueError(f"capacity {msg.capacity} is not a multiple of {PAGE_SIZE}")
                changes["capacity_pages"] = msg.capacity // PAGE_SIZE
            if msg.high_percent is not None:
                changes["high_percent"] = float(msg.high_percent)
            if msg.low_percent is not None:
                changes["low_percent"] = float(msg.low_percent)
            if msg.quotas:
                if any(size % PAGE_SIZE for size in msg.quotas.values()):
                    raise ValueError(f"quotas must be multiples of {PAGE_SIZE}")
                named = dict(limits.quotas)
                named.update({k: v // PAGE_SIZE for k, v in msg.quotas.items() if k})
                changes["quotas"] = MappingProxyType(named)
                if "" in msg.quotas:
                    changes["quota_pages"] = msg.quotas[""] // PAGE_SIZE
            if changes:
                limits = dataclasses.replace(limits, **changes)  # type: ignore[arg-type]
        except (PolicyError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        if policy is not self.policy or limits is not self.limits:
            self.counters.add(HostCounter.POLICY_CHANGES)
            log.info("admission now: policy %s, capacity %d pages, watermarks %g/%g%%, quota %s, quotas %s",
                     policy.spec, limits.capacity_pages, limits.high_percent, limits.low_percent,
                     limits.quota_pages, dict(limits.quotas))
        self.policy, self.limits = policy, limits
        return self.configuration()

    def configuration(self) -> dict[str, object]:
        limits = self.limits
        return {"policy": self.policy.spec, "delay_ms": self.policy.delay * 1000,
                "capacity_pages": limits.capacity_pages, "high_percent": limits.high_percent,
                "low_percent": limits.low_percent, "quota_pages": limits.quota_pages,
                "quotas": dict(limits.quotas), "weights": dict(limits.weights)}

    def stats(self, client: ClientPages | None = None, admin: bool = False) -> dict[str, object]:
        """The store's counters; per-client detail for an admin, or only the asking client's own."""
        snap = self.sampler.get()
        stats: dict[str, object] = {
            "instance": self.instance,
            "pid": os.getpid(),
            "pages_stored": self.pages,
            "bytes_stored": self.pages * PAGE_SIZE,
            "slab_bytes_mapped": sum(c.slab.mapped_bytes for c in self.clients.values()),
            "capacity_pages": self.limits.capacity_pages,
            "quota_pages": self.limits.quota_pages,
            "under_pressure": self.pressure,
            "policy": self.policy.spec,
            "draining": self.draining,
            "used_percent": snap.used_percent,
            "high_percent": self.limits.high_percent,
            "low_percent": self.limits.low_percent,
            "pressure_samples": self.sampler.samples,
            "connections_active": self.connections_active,
            "pressure_risks": self.pressure_risks,
            "log_lines_dropped": OUTPUT.dropped,
        }
        stats.update(self.counters.as_dict())
        if admin:
            stats["clients"] = {c.name: self.client_stats(c) for c in self.clients.values()}
        elif client is not None:
            stats["clients"] = {client.name: self.client_stats(client)}
        return stats

    def close(self) -> None:
        for client in self.clients.values():
            client.slab.close()
