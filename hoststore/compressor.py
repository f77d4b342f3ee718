"""Compressing pages the store holds, in worker threads: behind the put, and again when idle.

**Behind the put.** A put is answered as soon as its pages are admitted: each
goes into its client's size classes as it came (a whole page, *pending*), and
the answer waits for no compression.  :meth:`Compressor.run` takes pending
pages in batches, compresses them in a worker thread (the compressors release
the GIL: the event loop keeps serving meanwhile), and puts each one back in
its smaller class.  Until its turn a page costs a whole page against the
capacity, as it really does; ``pending_pages`` says how far behind it is.

**Idle pages, harder** (``--recompress-after``): pages nobody has read or
written for that long are compressed again with zstd's stronger setting, and
with ``--recompress-dictionary`` with a dictionary trained on the client's
own idle pages, at most ``--recompress-rate`` pages a second.  A page with a
dictionary decodes in the store only: its client asks for it over the wire,
which is what an idle page costs least.

Both work on a copy and put the result back only where the page is still the
same version (rewritten or dropped meanwhile, it is left as it now is; a page
being handed back is put back too: the hand-back settles by version, which
stays), and a recompression only where it is smaller.  Shared readers see the
page retracted for the move and published again after, as for any rewrite.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Iterable

import trio
import zstandard

from pagewire.codec import (CLASS_SIZES, DEFAULT_RECOMPRESS_RATE, Codec, DecodeError, class_of, encode_batch,
                            encode_hard, hard_compressor)

from .clientpages import NIL, ClientPages
from .hostcounters import HostCounter
from .zslab import Encoded

log = logging.getLogger("hoststore")

BATCH = 256  # pages per trip to a worker thread
DICTIONARY_BYTES = 32 * 1024
DICTIONARY_SAMPLES = 2000  # idle pages a dictionary is trained on (fewer: not yet)


@dataclasses.dataclass(frozen=True)
class Idle:
    """``--recompress-after`` and its companions."""

    after: float = 0.0  # seconds unread and unwritten; 0: never
    rate: float = DEFAULT_RECOMPRESS_RATE  # pages a second at most, all clients together
    dictionary: bool = False
    tick: float = 1.0
    samples: int = DICTIONARY_SAMPLES  # idle pages a dictionary is trained on


def idle_from_args(args: argparse.Namespace) -> Idle:
    """The recompression its options ask for (``pagewire.codec.add_compress_arguments``)."""
    if not args.recompress_after:
        return Idle()
    return Idle(after=args.recompress_after, rate=args.recompress_rate or DEFAULT_RECOMPRESS_RATE,
                dictionary=bool(args.recompress_dictionary))


Work = tuple[ClientPages, int, int]  # a client, a page, the version to work on


def _timed(encode_all: Callable[[ClientPages, list[bytes]], list[Encoded]], client: ClientPages,
           pages: list[bytes]) -> tuple[list[Encoded], int]:
    """In the worker thread: the work, and the time it took there."""
    start = time.perf_counter_ns()
    out = encode_all(client, pages)
    return out, time.perf_counter_ns() - start


class Compressor:
    def __init__(self, codec: Codec | None, threads: int | None = None,
                 registered: Callable[[ClientPages], bool] = lambda client: True,
                 count: Callable[[ClientPages, HostCounter, int], None] = lambda client, cause, n: None,
                 compressed: Callable[[], None] = lambda: None) -> None:
        """``registered``: whether a client is still the store's (a page of one dropped or
        replaced by a new instance is not worth compressing); ``count``: the store's counters;
        ``compressed``: told after each batch (the store notes its memory then)."""
        self.compressed = compressed
        self.codec = codec
        self.registered = registered
        self.count = count
        self.threads = threads or os.cpu_count() or 1
        self.limiter = trio.CapacityLimiter(self.threads)
        self.queue: collections.deque[Work] = collections.deque()
        self._wake = trio.Event()
        self.compress_ns = 0
        self.decompress_ns = 0

    # -- behind the put ------------------------------------------------------------------

    def admitted(self, client: ClientPages, page: int, seq: int) -> None:
        """Version ``seq`` of ``page`` went in as it came: compress it when its turn comes."""
        self.queue.append((client, page, seq))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Compress pending pages as they come, until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.settle()

    async def settle(self) -> int:
        """Compress every page pending now; how many were compressed."""
        done = 0
        while self.queue:
            # Newest first: their pages are at the end of the whole-page class, so freeing
            # each there once it is compressed moves no other page.
            batch = [self.queue.pop() for _ in range(min(BATCH, len(self.queue)))]
            done += await self._recode(batch, self._encode_fast, pending=True)
            self.compressed()
        return done

    def _encode_fast(self, client: ClientPages, pages: list[bytes]) -> list[Encoded]:
        codec = self.codec
        assert codec is not None
        return encode_batch(pages, codec, self.threads)

    # -- idle pages, harder -----------------------------------------------------------------

    async def recompress_idle(self, idle: Idle, clients: Callable[[], Iterable[ClientPages]],
                              stamp: Callable[[], int], *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every tick, recompress up to ``rate * tick`` pages idle for ``after`` seconds,
        oldest first, until cancelled.  ``stamp``: the store's use stamp now (a page used
        since a stamp has a later one)."""
        marks: collections.deque[tuple[float, int]] = collections.deque()
        task_status.started()
        while True:
            now = trio.current_time()
            marks.append((now, stamp()))
            while len(marks) > 1 and marks[1][0] <= now - idle.after:
                marks.popleft()
            if marks[0][0] <= now - idle.after:
                await self.recompress_round(idle, clients(), marks[0][1], int(idle.rate * idle.tick))
            await trio.sleep(idle.tick)

    async def recompress_round(self, idle: Idle, clients: Iterable[ClientPages], before: int, budget: int) -> int:
        """Try up to ``budget`` pages last used at stamp ``before`` or earlier; how many
        were made smaller."""
        done = 0
        for client in list(clients):
            z = client.zslab
            if z is None or budget <= 0:
                continue
            work = self._idle_pages(client, before, budget)
            if idle.dictionary and z.dictionary is None:
                if len(work) < idle.samples <= client.count:
                    work = self._idle_pages(client, before, idle.samples)
                if len(work) >= idle.samples:
                    await self._train(client, work, idle.samples)
            work = work[:budget]
            budget -= len(work)  # the rate bounds the work, whether or not it pays
            n = await self._recode(work, self._encode_hard, pending=False)
            done += n
            if n:
                self.count(client, HostCounter.RECOMPRESSED, n)
        return done

    def _idle_pages(self, client: ClientPages, before: int, limit: int) -> list[Work]:
        """Up to ``limit`` pages last used at stamp ``before`` or earlier, not recompressed yet,
        oldest first (a walk of the least recently used end, bounded)."""
        z = client.zslab
        assert z is not None
        out: list[Work] = []
        slot, steps = client.tail, 0
        while slot != NIL and len(out) < limit and steps < 8 * limit and client.stamp[slot] <= before:
            if not z.is_pending(slot) and not z.is_hard(slot) and z.encoding(slot) != Codec.RAW:
                out.append((client, client.page_of[slot], client.seq_of[slot]))
            slot, steps = client.prev[slot], steps + 1
        return out

    async def _train(self, client: ClientPages, work: list[Work], samples_wanted: int) -> None:
        """A dictionary from a sample of the client's idle pages (decoded here, trained in a thread)."""
        z = client.zslab
        assert z is not None
        samples = []
        for _, page, _ in random.Random(len(work)).sample(work, samples_wanted):
            try:
                samples.append(z.decoded(client.index.get(page)))
            except DecodeError:
                continue  # damaged: a read of it says so; it teaches the dictionary nothing
        try:
            trained = await trio.to_thread.run_sync(zstandard.train_dictionary, DICTIONARY_BYTES, samples,
                                                    limiter=self.limiter)
        except zstandard.ZstdError as exc:
            log.warning("client %r: no dictionary could be trained on its idle pages (%s)", client.name, exc)
            return
        if client.zslab is z and z.dictionary is None:
            z.set_dictionary(trained)
            log.info("client %r: idle pages are now recompressed with a %d-byte dictionary trained on them",
                     client.name, len(trained.as_bytes()))

    def _encode_hard(self, client: ClientPages, pages: list[bytes]) -> list[Encoded]:
        z = client.zslab
        dictionary = z.dictionary if z is not None else None
        compressor = hard_compressor(dictionary)
        codec = Codec.ZSTD if dictionary is None else Codec.ZSTD_DICT
        return [encode_hard(page, compressor, codec) for page in pages]

    # -- the one recode step ------------------------------------------------------------------

    def _current(self, work: list[Work], pending: bool) -> list[tuple[int, int, int]]:
        """(index in ``work``, page, version) of the pages of one client still holding
        exactly that version, and pending (or, for ``pending`` False, compressed and not
        recompressed yet).  A page being handed back is recoded too: its version, which
        the hand-back settles by, stays the same."""
        client = work[0][0]
        z = client.zslab
        if z is None or not self.registered(client):
            return []
        index, seq_of = client.index, client.seq_of
        out = []
        for i, (_, page, seq) in enumerate(work):
            slot = index.get(page)
            if slot < 0 or seq_of[slot] != seq or z.is_pending(slot) != pending:
                continue
            if pending or not z.is_hard(slot):
                out.append((i, page, seq))
        return out

    async def _recode(self, work: list[Work], encode_all: Callable[[ClientPages, list[bytes]], list[Encoded]],
                      pending: bool) -> int:
        """Encode the pages of ``work`` anew in a worker thread (by client: a dictionary is a
        client's), and put back each that is still as it was; how many were.  ``pending``:
        pages compressed at last; otherwise idle ones recompressed."""
        by_client: dict[int, list[Work]] = {}
        for w in work:
            by_client.setdefault(id(w[0]), []).append(w)
        done = 0
        for items in by_client.values():
            client, z = items[0][0], items[0][0].zslab
            pages, kept = [], []
            for _, page, seq in self._current(items, pending):
                try:
                    pages.append(z.decoded(client.index.get(page)))  # type: ignore[union-attr]
                except DecodeError:
                    continue  # damaged: a read of it fails, and says so
                kept.append((client, page, seq))
            if not kept:
                continue
            try:
                encoded, took = await trio.to_thread.run_sync(_timed, encode_all, client, pages,
                                                              limiter=self.limiter)
            except Exception:  # noqa: BLE001 - a bug here must not stop the store: the pages stay as they are
                log.exception("could not compress %d pages of client %r: they stay as they are", len(pages),
                              client.name)
                continue
            self.compress_ns += took
            still = {i for i, _, _ in self._current(kept, pending)}
            for i, ((c, page, _), enc) in enumerate(zip(kept, encoded)):
                if i in still:
                    done += self._put_back(c, c.index.get(page), enc, pending)
        return done

    @staticmethod
    def _put_back(client: ClientPages, slot: int, enc: Encoded, pending: bool) -> int:
        """A page encoded anew back in its slot; 1 if it went in anew.  A recompression
        that would not make it smaller keeps the bytes it has (marked, so as not to be
        tried again)."""
        z = client.zslab
        assert z is not None
        if not pending and CLASS_SIZES[class_of(len(enc[1]))] >= z.class_bytes(slot):
            z.mark_hard(slot)
            return 0
        client.recode(slot, enc, hard=not pending)
        return 1
