"""The decision trace: what the store decides, as it decides it, for whoever asks
(``vswapctl trace``).  Bounded so that a slow reader never slows the store: each
reader has a queue of at most ``QUEUE`` events, the oldest dropped (and counted)
when it is full, and nothing at all is built while nobody reads.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import trio

QUEUE = 4096


class Reader:
    def __init__(self, sample: int) -> None:
        self.sample = max(1, sample)
        self.events: deque[dict[str, Any]] = deque(maxlen=QUEUE)
        self.seen = 0
        self.dropped = 0
        self.arrived = trio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        self.seen += 1
        if self.seen % self.sample:
            return
        if len(self.events) == QUEUE:
            self.dropped += 1  # the deque drops the oldest
        self.events.append(event)
        self.arrived.set()

    def take(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        out = [self.events.popleft() for _ in range(min(limit, len(self.events)))]
        dropped, self.dropped = self.dropped, 0
        if not self.events:
            self.arrived = trio.Event()
        return out, dropped


class Trace:
    def __init__(self) -> None:
        self.readers: dict[object, Reader] = {}

    @property
    def active(self) -> bool:
        return bool(self.readers)

    def reader(self, who: object, sample: int) -> Reader:
        reader = self.readers.get(who)
        if reader is None or reader.sample != max(1, sample):
            reader = self.readers[who] = Reader(sample)
        return reader

    def forget(self, who: object) -> None:
        self.readers.pop(who, None)

    def emit(self, kind: str, **fields: Any) -> None:
        event = {"time": round(time.time(), 6), "event": kind, **fields}
        for reader in self.readers.values():
            reader.offer(event)
