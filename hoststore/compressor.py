"""Compressing admitted pages behind the put, in worker threads.

A put is answered as soon as its pages are admitted: each goes into its
client's size classes as it came (a whole page, ``pending``), and the store's
answer does not wait for any compression.  This engine takes the pending
pages in batches, compresses them in a worker thread (the compressors release
the GIL: the event loop keeps serving meanwhile), and puts each one back in
its smaller class, unless it changed in between (a newer version, a drop, a
hand-back under way: then it is left as it is, and the newer version has its
own turn).  Shared readers see the page retracted for the move and published
again after, as for any rewrite.

Until its turn a page costs a whole page against the capacity, as it really
does; ``pending_pages`` says how far behind the engine is.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable

import trio

from pagewire.codec import Codec, encode

from .clientpages import NIL, ClientPages
from .zslab import Encoded

log = logging.getLogger("hoststore")

BATCH = 256  # pages per trip to a worker thread


class Compressor:
    def __init__(self, codec: Codec | None, threads: int | None = None,
                 registered: Callable[[ClientPages], bool] = lambda client: True) -> None:
        """``registered``: whether a client is still the store's (a page of one dropped or
        replaced by a new instance is not worth compressing)."""
        self.codec = codec
        self.registered = registered
        self.limiter = trio.CapacityLimiter(threads or os.cpu_count() or 1)
        self.queue: collections.deque[tuple[ClientPages, int, int]] = collections.deque()
        self._wake = trio.Event()
        self.compress_ns = 0
        self.decompress_ns = 0

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
            done += await self._round()
        return done

    def _slot(self, client: ClientPages, page: int, seq: int) -> int:
        """The slot still holding exactly that version, pending and not being handed back; or NIL."""
        z = client.zslab
        if z is None or not self.registered(client):
            return NIL
        slot = client.index.get(page)
        if slot == NIL or client.seq_of[slot] != seq or client.lent[slot] or not z.is_pending(slot):
            return NIL
        return slot

    async def _round(self) -> int:
        batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
        todo, raw = [], []
        for client, page, seq in batch:
            slot = self._slot(client, page, seq)
            if slot != NIL:
                todo.append((client, page, seq))
                raw.append(bytes(client.zslab.encoded_view(slot)))  # type: ignore[union-attr]
        if not todo:
            return 0
        encoded, took = await trio.to_thread.run_sync(self._encode_all, raw, limiter=self.limiter)
        self.compress_ns += took
        done = 0
        for (client, page, seq), enc in zip(todo, encoded):
            slot = self._slot(client, page, seq)
            if slot != NIL:
                client.recode(slot, enc)
                done += 1
        return done

    def _encode_all(self, pages: list[bytes]) -> tuple[list[Encoded], int]:
        codec = self.codec
        assert codec is not None
        start = time.perf_counter_ns()
        out = [encode(page, codec) for page in pages]
        return out, time.perf_counter_ns() - start
