"""A page backend in a Redis Cluster (``hoststore --tier``): the store's data lives there.

The store keeps its whole role: clients, admission, counters, hand-back, all as
in :class:`~hoststore.store.Store`, whose metadata (which pages, which version,
how old) stays here; this backend (the contract: ``hoststore.backend``) holds the data.  Only the data moves to the tier, and admission reads the
cluster's memory instead of this machine's.

How a page is never lost or served wrong:

* A put records its accepted pages at once (so that capacity and quotas count
  them), writes them to the cluster, and answers STORED only for pages a replica
  acknowledged.  Any other page is refused with the reason, and the version just
  recorded goes, with any older one: the client writes it to its backing file.
* A read asks the cluster for the exact version recorded here.  While a node is
  unreachable (a master died and its replica is not promoted yet) it asks again,
  for up to ``read_timeout``; the client waits longer than that.  A page the
  cluster no longer has, at the version recorded, is answered missing and
  counted (``tier_lost``): the client then knows, instead of reading garbage.
* What the store forgets (invalidated, handed back, replaced by a refused
  version, a client that is gone) is deleted in the background by version, so
  a delete that arrives late can never remove a newer write.
* Pages on a master without a replica in sync are one failure from lost: new
  ones are refused (``replication``), and those it holds are handed back to
  their clients while it can still be read (cause ``replication``).
* While it runs, the store keeps a heartbeat in the cluster, so that
  ``vswapctl tier-sweep`` never deletes its keys; it deletes it at a clean exit,
  after its own sweep.

Requests wait on the cluster in worker threads (a pool shared by all clients:
a node that hangs slows everyone until its socket times out), and the metadata
is checked again after every wait: the sequence numbers of a page only grow,
so a check by version is enough.  A version on its way to the cluster is never
taken for lost, nor handed back before it is there.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from pagewire import auth
from pagewire.codec import DecodeError
from pagewire.messages import PAGE_SIZE, HandBack, HandBackCause, PageStatus

from .clientpages import NIL, ClientPages
from .clients import RequestError
from .hostcounters import REFUSAL_COUNTER, HostCounter
from .policy import Limits
from .pressure import Sampler
from .redistier import FailoverScope, RedisClusterTier, TierUnavailable
from .backend import Bookkeeper, PutPlan
from .tiercodec import TierCodec
from .store import Store
from .tiercounters import TierCounter
from .tierpresence import Presence

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hoststore")
T = TypeVar("T")

MEMORY_INTERVAL = 0.1  # seconds between reads of the masters' memory
DELETE_INTERVAL = 0.05  # seconds between delete batches
DELETE_BATCH = 4096  # pages per delete batch


def tiered_store(limits: Limits, tier: RedisClusterTier, **options: Any) -> Store:
    """A store whose pages live in ``tier``; its memory pressure is the cluster's."""
    options.setdefault("sampler", Sampler(0.0, source=tier.snapshot))
    return Store(limits, backend=TierPages(tier), **options)


class TierPages:
    keeps_data = False  # admission records versions; commit writes the data to the cluster
    shares_memory = False  # no page is in our memory to share

    def __init__(self, tier: RedisClusterTier) -> None:
        self.tier = tier
        self.presence = Presence(tier)  # the heartbeat, and the sweep at exit
        self._store: Bookkeeper | None = None
        self.codec: TierCodec | None = None
        self._ids = 0
        self._limiter = trio.CapacityLimiter(16)  # writes, deletes, upkeep
        # Reads of their own: one abandoned at its deadline keeps its worker until its
        # socket gives up, and must not hold up writes meanwhile.
        self._read_limiter = trio.CapacityLimiter(16)
        self._deletes: list[tuple[int, int, int]] = []  # (tier id, page, version): to delete
        self._writing: dict[int, dict[int, int]] = {}  # tier id -> {page: version} of writes in flight
        self._drops: list[tuple[int, list[int]]] = []  # (tier id, runs): whole runs of clients gone
        self._wake = trio.Event()
        self._beat_limiter = trio.CapacityLimiter(1)  # the heartbeat waits for no write
        failover = tier.read_failover()
        log.log(logging.INFO if failover.scope == FailoverScope.SHARD else logging.WARNING,
                "page tier: %s", failover.cost)

    @property
    def store(self) -> Bookkeeper:
        assert self._store is not None, "the backend is not bound to a store"
        return self._store

    def bind(self, store: Bookkeeper) -> None:
        self._store = store
        self.tier.instance = store.instance  # every key names the store instance its clients see
        codec = store.compressor.codec
        self.codec = TierCodec(codec) if codec is not None else None
        self.tier.compressed = self.codec is not None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- clients --------------------------------------------------------------------

    def new_client(self, name: str, npages: int, instance: str, shared_slots: int, max_slots: int = 0
                   ) -> ClientPages:
        self._ids += 1
        return ClientPages(name, npages, instance, auth.new_secret(), tier_id=self._ids)

    def close_client(self, client: ClientPages) -> int:
        runs = client.index.blocks_in(0, client.npages)  # a run is an index block (redistier.RUN_SHIFT)
        if runs:
            self._drops.append((client.tier_id, runs))
            self._wake.set()
        return client.close()

    # -- pages ----------------------------------------------------------------------

    def forgotten(self, client: ClientPages, page: int, seq: int) -> None:
        """A version the store dropped: deleted from the cluster in the background."""
        self._deletes.append((client.tier_id, page, seq))
        self._wake.set()

    async def commit(self, client: ClientPages, plan: PutPlan, data: bytes | memoryview) -> None:
        """Write the pages admitted to the cluster; any a replica did not acknowledge in
        time is refused with the reason, and unrecorded."""
        if plan.accepted:
            first, seq = plan.first, plan.seq
            view = memoryview(data)
            pages = [first + i for i in plan.accepted]
            data = [view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in plan.accepted]
            writing = self._writing.setdefault(client.tier_id, {})
            for page in pages:
                writing[page] = seq
            replaced = set(plan.replaced)
            try:
                statuses, sizes = await self._call(self._write, client.tier_id, seq, pages, data)
                if self.codec is not None:
                    self.codec.written([n for n, s in zip(sizes, statuses) if s == PageStatus.STORED])
            except BaseException:  # cancelled (a reconnect superseded us) or a bug: nothing is kept
                for i in plan.accepted:
                    self._unrecord(client, plan.out, i, first + i, seq, PageStatus.REFUSED_TIER, i in replaced)
                raise
            finally:
                for page in pages:
                    if writing.get(page) == seq:
                        del writing[page]
                if not writing and self._writing.get(client.tier_id) is writing:
                    del self._writing[client.tier_id]
            for i, status in zip(plan.accepted, statuses):
                slot = client.index.get(first + i)
                if status == PageStatus.STORED and slot != NIL and client.seq_of[slot] == seq:
                    continue
                # Refused by the tier, or forgotten while it was written (a newer put from a
                # connection that superseded this one): either way not ours to answer stored.
                self._unrecord(client, plan.out, i, first + i, seq,
                               status if status != PageStatus.STORED else PageStatus.REFUSED_TIER, i in replaced)

    def _write(self, tier_id: int, seq: int, pages: list[int], data: list[memoryview]
               ) -> tuple[list[PageStatus], list[int]]:
        """In a worker thread: the pages written to the tier, compressed first with --compress;
        their statuses, and the size of each value's body."""
        if self.codec is None:
            return self.tier.write(tier_id, seq, pages, data), [PAGE_SIZE] * len(pages)
        values = self.codec.encode_all(data)
        return self.tier.write(tier_id, seq, pages, values), [len(v) for v in values]

    def _fill(self, client: ClientPages, page: int, value: memoryview, out: memoryview | bytearray) -> bool:
        """A value read from the tier, into ``out``: False if it is damaged (counted)."""
        if self.codec is None:
            out[:] = value
            return True
        try:
            TierCodec.decode(value, out)
        except DecodeError as exc:
            self.store.count(client, HostCounter.DECODE_ERRORS)
            log.error("page tier: page %d of client %r does not decode (%s): damaged", page, client.name, exc)
            return False
        return True

    def _being_written(self, client: ClientPages, page: int, seq: int) -> bool:
        """Version ``seq`` of ``page`` is recorded and on its way to the tier, not there yet."""
        return self._writing.get(client.tier_id, {}).get(page) == seq

    def _unrecord(self, client: ClientPages, out: bytearray, i: int, page: int, seq: int, status: PageStatus,
                  replaced: bool) -> None:
        """The tier did not take version ``seq`` of ``page``: refused, and forgotten here
        (unless something newer came meanwhile).  What it may have written goes too."""
        out[i] = status
        self.store.count(client, REFUSAL_COUNTER[status])
        slot = client.index.get(page)
        if slot != NIL and client.seq_of[slot] == seq:
            self.store.drop(client, slot)
            if replaced:  # the older version went when this one was recorded
                self.store.count(client, HostCounter.STALE_DROPPED)
        else:
            self.forgotten(client, page, seq)

    async def _read(self, client: ClientPages, pages: list[int], seqs: list[int]) -> list[memoryview | None]:
        """The pages' data at those versions, asking again while the cluster settles;
        RequestError once ``read_timeout`` has passed, however long one attempt would take
        (a read changes nothing: an attempt past the deadline is left to finish alone)."""
        timeout = self.tier.config.read_timeout
        backoff = 0.05
        failure = "no answer"
        with trio.move_on_after(timeout):
            while True:
                try:
                    return await trio.to_thread.run_sync(self.tier.read, client.tier_id, pages, seqs,
                                                         limiter=self._read_limiter, abandon_on_cancel=True)
                except TierUnavailable as exc:
                    failure = str(exc)
                    self.tier.count(TierCounter.READ_RETRIES)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
        self.tier.count(TierCounter.READ_FAILURES)
        log.error("page tier: a read of %d pages of client %r gave up after %gs: %s", len(pages), client.name,
                  timeout, failure)
        raise RequestError(f"the page tier did not answer in {timeout:g}s: {failure}")

    def _lost(self, client: ClientPages, page: int, seq: int) -> None:
        """The tier no longer has a version this store holds: say so once, and forget it.
        (Not one on its way there: its put answers for it.)"""
        slot = client.index.get(page)
        if slot != NIL and client.seq_of[slot] == seq and not self._being_written(client, page, seq):
            self.tier.count(TierCounter.LOST)
            log.error("page tier: page %d of client %r (version %d) is not in the cluster any more", page,
                      client.name, seq)
            self.store.drop(client, slot)

    async def get_into(self, client: ClientPages, pages: array, status: bytearray | memoryview, seqs: memoryview,
                       data: bytearray | memoryview) -> int:
        """Each page held, read from the cluster at the version recorded here; pages read."""
        want: list[int] = []
        for i, page in enumerate(pages):
            slot = client.index.get(page)
            if slot == NIL:
                status[i] = PageStatus.MISSING
            else:
                want.append(i)
                seqs[i] = client.seq_of[slot]
        if want:
            # A version on its way to the tier when the read leaves may not be there yet,
            # and may be by the time the read is back: missing then, never lost.
            in_flight = {i for i in want if self._being_written(client, pages[i], seqs[i])}
            found = await self._read(client, [pages[i] for i in want], [seqs[i] for i in want])
            stamp = self.store.next_stamp()
            for i, value in zip(want, found):
                if value is None:
                    if i not in in_flight:
                        self._lost(client, pages[i], seqs[i])
                    seqs[i] = 0
                    status[i] = PageStatus.MISSING
                    continue
                if not self._fill(client, pages[i], value, memoryview(data)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]):
                    seqs[i] = 0  # no client holds version 0: a checksum error (EIO) there, never data
                    continue
                slot = client.index.get(pages[i])
                if slot != NIL and client.seq_of[slot] == seqs[i]:
                    client.touch(slot, stamp)
        return sum(1 for i, s in enumerate(status[: len(pages)]) if s == PageStatus.STORED and seqs[i])

    async def lend(self, client: ClientPages, cause: HandBackCause, limit: int) -> HandBack | None:
        """The oldest pages (for ``replication``: pages on masters without a replica in
        sync), read from the tier; pages it cannot give now stay stored."""
        if cause == HandBackCause.REPLICATION:
            lent_pages, lent_seqs, _, _ = client.lend_slots(await self._unreplicated_slots(client, limit),
                                                         with_data=False)
        else:
            lent_pages, lent_seqs, _, _ = client.lend_oldest(limit, with_data=False)
        pages, seqs = array("Q"), array("Q")
        for page, seq in zip(lent_pages, lent_seqs):
            if self._being_written(client, page, seq):  # not acknowledged yet: not ours to hand back
                client.unlend(client.lent_slot(page, seq))
            else:
                pages.append(page)
                seqs.append(seq)
        if not pages:
            return None
        try:
            found = await self._read(client, list(pages), list(seqs))
        except BaseException:
            for page, seq in zip(pages, seqs):  # none goes: every page still lent stays stored
                slot = client.lent_slot(page, seq)
                if slot != NIL:
                    client.unlend(slot)
            raise
        kept_pages, kept_seqs = array("Q"), array("Q")
        data = bytearray()
        for page, seq, value in zip(pages, seqs, found):
            slot = client.lent_slot(page, seq)
            if slot == NIL:  # rewritten or dropped while we read
                continue
            if value is None:
                client.unlend(slot)
                self._lost(client, page, seq)
                continue
            out = bytearray(PAGE_SIZE)
            if not self._fill(client, page, value, out):
                client.unlend(slot)
                self.store.drop(client, slot)  # damaged: not handed back, and a read of it fails
                continue
            kept_pages.append(page)
            kept_seqs.append(seq)
            data += out
        if not kept_pages:
            return None
        return HandBack(cause, kept_pages, kept_seqs, data)

    async def _unreplicated_slots(self, client: ClientPages, limit: int) -> list[int]:
        """Up to ``limit`` of the client's pages that sit on a master without a replica
        in sync, not lent and not on their way there."""
        masters = self.tier.unreplicated
        if not masters:
            return []
        runs = await self._call(self.tier.runs_on, client.tier_id, client.index.blocks_in(0, client.npages), masters)
        slots = []
        for page, slot in client.index.stored_in_blocks(runs, 0, client.npages):
            if len(slots) == limit:
                break
            if not client.lent[slot] and not self._being_written(client, page, client.seq_of[slot]):
                slots.append(slot)
        return slots

    # -- the cluster's upkeep -------------------------------------------------------

    async def run(self, store: Bookkeeper, server: Server | None = None, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: keep the heartbeat (the first one before anything else),
        watch the masters' memory and replicas, delete what the store forgot, and, with
        the ``server`` that reaches the clients, hand back pages on masters without a
        replica in sync."""
        await self._beat()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._watch_memory)
            nursery.start_soon(self._delete_loop)
            if server is not None:
                nursery.start_soon(self._rescue_loop, server)
            task_status.started()

    async def _beat(self) -> None:
        try:
            await trio.to_thread.run_sync(self.presence.beat, limiter=self._beat_limiter)
        except TierUnavailable as exc:
            log.warning("page tier: the heartbeat reached no master (%s); `vswapctl tier-sweep` takes this store "
                        "for gone %gs after its last one", exc, self.tier.config.heartbeat_ttl)
        except Exception:  # noqa: BLE001 - the next beat tries again
            log.exception("page tier: error while writing the heartbeat")

    async def _heartbeat_loop(self) -> None:
        interval = self.presence.heartbeat_interval()
        while True:
            await trio.sleep(interval)
            await self._beat()

    async def _rescue_loop(self, server: Server) -> None:
        """Hand back the pages that sit on masters without a replica in sync, while those
        masters can still be read: at the pace each client takes them (one request in
        flight per client); a client that took none rests, as under pressure."""
        config = server.config
        busy: set[str] = set()
        resting: dict[str, float] = {}

        async def rescue(client: ClientPages) -> None:
            try:
                while not self.store.draining and self.tier.unreplicated and client.connected:
                    if not await server.hand_back(client, HandBackCause.REPLICATION, config.handback_batch):
                        resting[client.name] = trio.current_time() + config.handback_rest
                        return
            finally:
                busy.discard(client.name)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(MEMORY_INTERVAL)
                if self.store.draining or not self.tier.unreplicated:
                    continue
                now = trio.current_time()
                for client in list(self.store.clients.values()):
                    if (client.connected and client.count > client.lent_count and client.name not in busy
                            and resting.get(client.name, 0.0) <= now):
                        busy.add(client.name)
                        nursery.start_soon(rescue, client)

    async def _watch_memory(self) -> None:
        while True:
            before = self.tier.unreplicated
            try:
                await self._call(self.tier.poll_memory)
            except Exception:  # noqa: BLE001 - admission keeps the last reading meanwhile
                log.exception("page tier: reading the masters' memory failed")
            for name in sorted(self.tier.unreplicated - before):
                log.warning("page tier: master %s has fewer than %d replica(s) in sync: its new pages are refused, "
                            "and those it holds are handed back", name, self.tier.config.replicas)
            for name in sorted(before - self.tier.unreplicated):
                log.info("page tier: master %s has its replica(s) in sync again (or no longer answers)", name)
            await trio.sleep(MEMORY_INTERVAL)

    async def _delete_loop(self) -> None:
        backoff = DELETE_INTERVAL
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.flush_deletes()
                backoff = DELETE_INTERVAL
            except Exception as exc:  # noqa: BLE001 - deletes wait; the store (and every page) must not go
                self.tier.count(TierCounter.DELETE_RETRIES)
                if isinstance(exc, TierUnavailable):
                    log.warning("page tier: deleting forgotten pages failed (%s); trying again", exc)
                else:
                    log.exception("page tier: error while deleting forgotten pages; trying again")
                self._wake.set()
                backoff = min(backoff * 2, 2.0)
            await trio.sleep(backoff)

    async def flush_deletes(self) -> None:
        """Delete what is waiting; what fails stays queued (TierUnavailable is raised)."""
        while self._drops:
            tier_id, runs = self._drops[0]
            await self._call(self.tier.drop_runs, tier_id, runs)
            self._drops.pop(0)
        while self._deletes:
            batch = self._deletes[:DELETE_BATCH]
            by_client: dict[int, tuple[list[int], list[int]]] = {}
            for tier_id, page, seq in batch:
                pages, seqs = by_client.setdefault(tier_id, ([], []))
                pages.append(page)
                seqs.append(seq)
            for tier_id, (pages, seqs) in by_client.items():
                await self._call(self.tier.delete, tier_id, pages, seqs)
            del self._deletes[: len(batch)]

    def stats(self) -> dict[str, Any]:
        stats = {**self.tier.stats(), "deletes_waiting": len(self._deletes) + len(self._drops)}
        if self.codec is not None:
            stats["compression"] = self.codec.stats()
        return stats

    async def aclose(self, timeout: float = 10.0) -> None:
        """At exit: delete what is waiting, then every key this store instance left,
        then its heartbeat (what is left then is for `vswapctl tier-sweep`)."""
        with trio.move_on_after(timeout):
            try:
                await self.flush_deletes()
                swept = await self._call(self.presence.sweep)
                if swept:
                    log.info("page tier: deleted %d keys left by this store", swept)
            except TierUnavailable as exc:
                log.warning("page tier: could not clean up the cluster at exit (%s)", exc)
        with trio.move_on_after(timeout):
            try:
                await self._call(self.presence.end_heartbeat)
            except TierUnavailable as exc:
                log.warning("page tier: the heartbeat stays until it expires (%s)", exc)
        self.presence.close()
        self.tier.close()

