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
import secrets
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from types import MappingProxyType
from typing import Any

import trio

from pagewire.codec import Codec
from pagewire.messages import PAGE_SIZE, Configure, GetAnswer, HandBack, HandBackCause, PageStatus, TakeStatus
from vswapcommon.counters import Counters

from . import ephemeral
from .backend import MemoryPages, PageBackend, PutPlan
from .clientpages import NIL, ClientPages
from .clients import DEFAULT_AWAY_TIMEOUT, DEFAULT_MAX_CLIENTS, ClientRegistry, RequestError
from .compressor import Compressor, Idle
from .hostcounters import HANDBACK_COUNTER, REFUSAL_COUNTER, HostCounter
from .policies import DecisionContext, Policy, PolicyError, Pressure, parse_policy
from .policy import ClientTerms, Limits, admit, share, under_pressure
from .pressure import Sampler
from .sizeclasses import Tally
from .slab import INDEX_BLOCK, SlabFull
from .storestats import Fullest, client_stats, store_stats
from .trace import Trace

__all__ = ["DEFAULT_AWAY_TIMEOUT", "DEFAULT_MAX_CLIENTS", "HostCounter", "PutPlan", "RequestError", "Store"]

log = logging.getLogger("hoststore")
INVALIDATE_BLOCKS = 64  # index blocks (64 * 256 pages) an invalidate scans between two turns of its pace


def take_whole(limits: Limits, client: ClientPages, plan: PutPlan, view: memoryview | None, used: int,
               terms: ClientTerms, stamp: int) -> bool:
    """Store a put as one run (``ClientPages.add_run``) if no page of it is stored yet
    and every page is admitted: the rules only refuse at or above a count, so the last
    page's decision, with the others counted, is every page's.  False: it must be
    decided page by page (so it is too whenever a page of it is stored, the policy had
    its say, pages are kept compressed or the store is draining: the caller checks)."""
    n = plan.n
    if client.index.any_in(plan.first, n):
        return False
    if admit(limits, False, used + n - 1, client.count + n - 1, False, terms) != PageStatus.STORED:
        return False
    try:
        client.add_run(plan.first, plan.seq, view, n, stamp)
    except SlabFull:
        return False  # page by page: as many as fit, the rest refused for memory
    plan.accepted.extend(range(n))
    return True


class Store:
    """All clients' pages, the admission state and the counters; one async path per operation."""

    def __init__(self, limits: Limits, sampler: Sampler, *, away_timeout: float = DEFAULT_AWAY_TIMEOUT,
                 max_clients: int = DEFAULT_MAX_CLIENTS, clock: Callable[[], float] = time.monotonic,
                 policy: Policy | None = None, backend: PageBackend | None = None,
                 compress: Codec | None = None, idle: Idle = Idle()) -> None:
        self.limits = limits
        self.policy: Policy = policy or Pressure()
        self.trace = Trace()
        self.sampler = sampler
        # Before the backend: it asks how to keep pages.
        self.compressor = Compressor(compress, registered=lambda c: self.clients.get(c.name) is c,
                                     count=self.count, compressed=lambda: self._note_fullest(every=True))
        self.idle = idle
        self.tally = Tally()  # the class bytes of every client's compressed pages
        self.fullest = Fullest()
        self.backend: PageBackend = backend or MemoryPages()
        # What keeps this store from serving reliably under machine-wide memory pressure
        # (its memory not locked, its reclaim not kept from doing I/O), as the daemon found it.
        self.pressure_risks: list[str] = []
        self.counters: Counters[HostCounter] = Counters(HostCounter)
        self.instance = secrets.token_hex(8)
        self.pressure = False
        self.draining = False
        self.pages = 0  # all clients together
        self.connections_active = 0
        self._stamp = 0
        self.registry = ClientRegistry(self, away_timeout=away_timeout, max_clients=max_clients, clock=clock)
        self.clients = self.registry.clients
        self.client_counters = self.registry.client_counters
        self.attach, self.bind, self.detach = self.registry.attach, self.registry.bind, self.registry.detach
        self.evict, self.held = self.registry.evict, self.registry.held
        self.backend.bind(self)

    @property
    def away_timeout(self) -> float:
        return self.registry.away_timeout

    def count(self, client: ClientPages, cause: HostCounter, n: int = 1) -> None:
        """Count for the store and for the client."""
        self.counters.add(cause, n)
        self.client_counters[client.name].add(cause, n)

    def next_stamp(self) -> int:
        self._stamp += 1
        return self._stamp

    # -- pages ----------------------------------------------------------------------

    async def put(self, client: ClientPages, first: int, seq: int, data: bytes | memoryview) -> bytes:
        """Offer pages ``first ..`` at version ``seq``; one status per page.  A refused
        page's older stored copy is dropped."""
        if not data or len(data) % PAGE_SIZE or seq < 1:
            raise RequestError(f"a put is whole pages at a version of 1 or more, not {len(data)} bytes at {seq}")
        plan = self._admit(client, first, seq, data)
        if plan.accepted and not self.backend.keeps_data:
            await self.backend.commit(client, plan, data)
        if plan.accepted:
            self._note_fullest()
        return self.finish_put(client, plan)

    def _note_fullest(self, every: bool = False) -> None:
        """After a put, and after each of the compressor's batches (``every``: the same
        pages in less memory)."""
        self.fullest.note(self.pages * PAGE_SIZE, self.clients.values(), every)

    async def put_staged(self, client: ClientPages, first: int, seq: int, at: int, n: int) -> bytes:
        """A put whose ``n`` pages are in the client's staging memory, from page ``at`` of it."""
        shared = client.shared
        if shared is None:
            raise RequestError("put_staged needs shared memory, which this client does not have")
        try:
            view = shared.staged(at, n)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        with view:
            return await self.put(client, first, seq, view)

    def _admit(self, client: ClientPages, first: int, seq: int, data: bytes | memoryview) -> PutPlan:
        """Decide each page of a put and record the accepted ones (with their data where
        the backend keeps it in the slab, their versions only otherwise).  Pages kept
        compressed go in as they came: the compressor's turn comes after the answer."""
        n = len(data) // PAGE_SIZE
        self._check_range(client, first, n)
        self.counters.add(HostCounter.PUT_REQUESTS)
        snapshot = self.sampler.get()
        self.pressure = under_pressure(snapshot, self.limits, self.pressure)
        stamp = self.next_stamp()
        plan = PutPlan(first, n, seq, bytearray(n), snapshot)
        out = plan.out
        view = memoryview(data) if self.backend.keeps_data else None
        index, seq_of, limits = client.index, client.seq_of, self.limits
        terms = self.terms(client)
        used = self.charged_pages()
        if not self.pressure and not self.draining and ephemeral.make_room(self, client, first, n, terms, used):
            used = self.charged_pages()
        z = client.zslab
        verdict = self.policy.decide(DecisionContext(
            client.name, first, n, snapshot, used, limits.capacity_pages, client.charged_pages, terms.quota_pages,
            terms.share_pages, self.pressure))
        if verdict is None and z is None and not self.draining and self._take_whole(client, plan, view, used, terms,
                                                                                    stamp):
            return plan
        for i in range(n):
            page = first + i
            slot = index.get(page)
            if slot != NIL and seq <= seq_of[slot]:
                out[i] = PageStatus.REFUSED_OUTDATED
                self.count(client, HostCounter.REFUSED_OUTDATED)
                continue
            if self.draining:
                status = PageStatus.REFUSED_DRAINING
            elif verdict is not None and verdict[i] != PageStatus.STORED:
                status = PageStatus(verdict[i])
            else:
                # Kept compressed, a new version may cost more than the old one (it goes in as a
                # whole page): it needs room as a new page does.
                held = client.count if z is None else client.charged_pages
                status = admit(limits, False, used, held, slot != NIL and z is None, terms)
            if status == PageStatus.STORED:
                page_data = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] if view is not None else None
                if z is None:
                    if self._record(client, plan, i, slot, page_data, stamp):
                        used += slot == NIL
                        continue
                else:
                    before = client.charged_pages
                    if self._record(client, plan, i, slot, page_data, stamp):
                        used += client.charged_pages - before
                        continue
                status = PageStatus.REFUSED_NOMEM
            before = client.charged_pages
            self.refuse(client, plan, i, status)
            used += client.charged_pages - before  # an older copy dropped: its room is free
        return plan

    def _take_whole(self, client: ClientPages, plan: PutPlan, view: memoryview | None, used: int,
                    terms: ClientTerms, stamp: int) -> bool:
        """The usual put, taken as one run (see :func:`take_whole`); False: page by page."""
        if not take_whole(self.limits, client, plan, view, used, terms, stamp):
            return False
        self.pages += plan.n
        return True

    def _record(self, client: ClientPages, plan: PutPlan, i: int, slot: int,
                page_data: memoryview | None, stamp: int) -> bool:
        """Store page ``i`` of the plan (over ``slot``, its older version, unless NIL);
        False when no memory could be had for it."""
        pending = page_data is not None and client.zslab is not None
        data = (Codec.RAW, page_data) if pending else page_data
        try:
            if slot != NIL:
                client.replace(slot, plan.seq, data, stamp, pending)
                plan.replaced.append(i)
            else:
                client.add(plan.first + i, plan.seq, data, stamp, pending)
                self.pages += 1
        except SlabFull as exc:
            log.warning("cannot map memory for a page (%s): refusing with reason nomem", exc)
            return False
        plan.accepted.append(i)
        if pending:
            self.compressor.admitted(client, plan.first + i, plan.seq)
        return True

    def charged_pages(self) -> int:
        """What all clients' pages cost against the capacity (``ClientPages.charged_bytes``):
        their size classes where the store keeps them compressed; whole pages otherwise,
        and with a tier (it compresses the values it writes to the cluster, whose memory
        is the tier's pressure: here a page is a page)."""
        if self.compressor.codec is None or not self.backend.keeps_data:
            return self.pages
        return -(-self.tally.bytes // PAGE_SIZE)

    def refuse(self, client: ClientPages, plan: PutPlan, i: int, status: PageStatus) -> None:
        """Page ``i`` of the plan is refused; an older stored copy must not outlive the refusal, and goes."""
        plan.out[i] = status
        self.count(client, REFUSAL_COUNTER[status])
        slot = client.index.get(plan.first + i)
        if slot != NIL:  # never stale: the old version must not outlive a refused new one
            self.drop(client, slot)
            self.count(client, HostCounter.STALE_DROPPED)

    def drop(self, client: ClientPages, slot: int) -> None:
        """Forget one stored page."""
        self.backend.forgotten(client, client.page_of[slot], client.seq_of[slot])
        client.remove(slot)
        self.pages -= 1

    def finish_put(self, client: ClientPages, plan: PutPlan) -> bytes:
        """Count what a put stored, and trace it."""
        out = plan.out
        accepted = sum(1 for i in plan.accepted if out[i] == PageStatus.STORED)
        replaced = sum(1 for i in plan.replaced if out[i] == PageStatus.STORED)
        if accepted:
            self.count(client, HostCounter.ACCEPTED, accepted)
        if replaced:
            self.count(client, HostCounter.REPLACED, replaced)
        if self.trace.active:
            refused = {PageStatus(s).name.lower().removeprefix("refused_"): out.count(s) for s in set(out) if s}
            self.trace.emit("put", client=client.name, first=plan.first, pages=plan.n,
                            stored=plan.n - sum(refused.values()), refused=refused,
                            used_percent=plan.snapshot.used_percent, policy=self.policy.spec)
        return bytes(out)

    async def get(self, client: ClientPages, pages: array, status: bytearray | memoryview, seqs: memoryview,
                  data: bytearray | memoryview) -> None:
        """Status, version and data of each page asked for, into the caller's zeroed
        buffers (an answer frame, or :func:`get_answer`'s); missing pages stay zeros."""
        if not pages or max(pages) >= client.npages:
            raise RequestError(f"a get asks for no page, or for pages outside the device's {client.npages} pages")
        self.counters.add(HostCounter.GET_REQUESTS)
        hits = await self.backend.get_into(client, pages, status, seqs, data)
        self.count(client, HostCounter.READS, hits)
        if hits < len(pages):
            self.count(client, HostCounter.MISSES, len(pages) - hits)

    async def invalidate(self, client: ClientPages, first: int, count: int, seq: int,
                         pace: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Drop stored pages in ``first .. first + count`` whose version is not newer than
        ``seq``; pages dropped.  The work follows what is stored, a window of the index
        at a time; ``pace(pages)`` is awaited before each (a server's fair share), so a
        huge range holds up no one."""
        if count < 1 or first < 0:
            raise RequestError(f"an invalidate drops 1 or more pages, not {count} from page {first}")
        self._check_range(client, first, count)
        self.counters.add(HostCounter.INVALIDATE_REQUESTS)
        index, end = client.index, first + count
        blocks = index.blocks_in(first, count)  # only the stored parts of the range
        dropped = 0
        for at in range(0, len(blocks), INVALIDATE_BLOCKS):
            window = blocks[at : at + INVALIDATE_BLOCKS]
            if pace is not None:
                await pace(len(window) * INDEX_BLOCK)
            dropped += self.invalidate_pages(client, [page for page, _ in index.stored_in_blocks(window, first, end)],
                                             seq)
        return dropped

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
        self.count(client, HostCounter.INVALIDATED, dropped)
        if self.trace.active and dropped:
            self.trace.emit("invalidate", client=client.name, pages=dropped)
        return dropped

    @staticmethod
    def _check_range(client: ClientPages, first: int, count: int) -> None:
        if first + count > client.npages:
            raise RequestError(f"pages {first}..{first + count - 1} outside the device's {client.npages} pages")

    # -- hand-back ------------------------------------------------------------------

    async def lend(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None:
        """Up to ``limit`` pages to hand back (the least recently used, as the backend
        picks them), lent until settled; None if the client has none to lend."""
        handback = await self.backend.lend(client, cause, limit)
        if handback is not None:
            self.counters.add(HostCounter.HANDBACK_REQUESTS)
        return handback

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
        self.count(client, HANDBACK_COUNTER[HandBackCause(handback.cause)], freed)
        if self.trace.active:
            self.trace.emit("handback", client=client.name, cause=str(handback.cause), pages=len(handback.pages),
                            freed=freed, not_needed=not_needed, failed=failed)
        if not_needed:
            self.count(client, HostCounter.HANDBACK_NOT_NEEDED, not_needed)
        if failed:
            self.count(client, HostCounter.HANDBACK_FAILED, failed)
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
        """Connected clients holding swap pages (ephemeral ones are dropped, not handed
        back: ``HandBackEngine``), in the order pressure should take from them:
        clients above their quota first, then by how far they are above their weighted
        share, then the one whose oldest page is oldest."""
        candidates = [c for c in self.clients.values() if c.connected and not c.ephemeral and c.count > c.lent_count]

        def key(c: ClientPages) -> tuple[int, int, int]:
            terms = self.terms(c)
            held = c.charged_pages
            over_quota = terms.quota_pages is not None and held > terms.quota_pages
            return (0 if over_quota else 1, -max(0, held - terms.share_pages), c.oldest_stamp or 0)

        return iter(sorted(candidates, key=key))

    # -- reporting ------------------------------------------------------------------

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
        return store_stats(self, client, admin)

    def client_stats(self, client: ClientPages) -> dict[str, object]:
        return client_stats(self, client)

    def close(self) -> None:
        for client in self.clients.values():
            client.slab.close()

    async def run(self, server: Any = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's upkeep, until cancelled: the compressor, and the backend's (a tier's
        heartbeat, deletes and rescue)."""
        async with trio.open_nursery() as nursery:
            if self.compressor.codec is not None:
                await nursery.start(self.compressor.run)
                if self.idle.after > 0:
                    await nursery.start(self.compressor.recompress_idle, self.idle,
                                        lambda: self.clients.values(), lambda: self._stamp)
            await nursery.start(self.backend.run, self, server)
            task_status.started()

    async def aclose(self) -> None:
        await self.backend.aclose()


async def get_answer(store: Store, client: ClientPages, pages: array) -> GetAnswer:
    """:meth:`Store.get` into buffers of its own, as one answer."""
    n = len(pages)
    status, seqs, data = bytearray(n), array("Q", bytes(8 * n)), bytearray(n * PAGE_SIZE)
    await store.get(client, pages, status, memoryview(seqs), data)
    return GetAnswer(bytes(status), seqs, data)
