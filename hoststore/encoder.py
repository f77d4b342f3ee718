"""Compressing a put's pages where the event loop does not wait for it.

A put of more than a few pages is encoded in a worker thread (the compressors
release the GIL, so other connections are served meanwhile, and the work of two
puts runs on two cores); a put of a page or two is encoded at once, since
handing it to a thread would cost more than the work.  The time spent is
counted, as zram counts it.
"""

from __future__ import annotations

import os
import time

import trio

from pagewire.codec import Codec, encode
from pagewire.messages import PAGE_SIZE

from .zslab import Encoded

INLINE_PAGES = 2


class Encoder:
    def __init__(self, compress: Codec | None, threads: int | None = None) -> None:
        self.compress = compress
        self.limiter = trio.CapacityLimiter(threads or os.cpu_count() or 1)
        self.compress_ns = 0
        self.decompress_ns = 0

    async def encode(self, data: bytes | memoryview) -> list[Encoded]:
        """Every page of ``data`` encoded (RAW where it does not shrink enough)."""
        if len(data) // PAGE_SIZE <= INLINE_PAGES:
            pages, took = self._encode_all(data)
        else:
            pages, took = await trio.to_thread.run_sync(self._encode_all, data, limiter=self.limiter)
        self.compress_ns += took
        return pages

    def _encode_all(self, data: bytes | memoryview) -> tuple[list[Encoded], int]:
        codec = self.compress
        assert codec is not None
        start = time.perf_counter_ns()
        with memoryview(data) as view:
            pages = [encode(view[at : at + PAGE_SIZE], codec) for at in range(0, len(view), PAGE_SIZE)]
        return pages, time.perf_counter_ns() - start
