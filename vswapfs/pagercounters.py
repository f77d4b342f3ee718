"""What the pager counts, by cause, defined once; and its burst-limited error log."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from pagewire.causes import refusal_counters, refusal_map
from vswapcommon.counters import Definition, Unit, define

PAGES, REQUESTS, EVENTS = Unit.PAGES, Unit.REQUESTS, Unit.EVENTS

PagerCounter = define("PagerCounter", (
    Definition("WRITE_REQUESTS", "write_requests", REQUESTS, "writes to the swap file (FUSE write requests)"),
    Definition("READ_REQUESTS", "read_requests", REQUESTS, "reads of the swap file (FUSE read requests)"),
    Definition("HOST_WRITES", "host_writes", PAGES, "pages the store accepted"),
    Definition("BACKING_WRITES", "backing_writes", PAGES, "pages written to the backing file"),
    Definition("HOST_READS", "host_reads", PAGES, "pages read from the store, checked"),
    Definition("SHARED_READS", "shared_reads", PAGES,
               "of those, read straight from memory the store shares with us (no round trip)"),
    Definition("SHARED_RETRIES", "shared_retries", PAGES,
               "pages copied from shared memory whose checksum failed (damaged, or rewritten under the "
               "copy): asked for over the wire"),
    Definition("BACKING_READS", "backing_reads", PAGES, "pages read from the backing file, checked"),
    Definition("ZERO_READS", "zero_reads", PAGES, "never-written pages read back as zeros"),
    Definition("SAME_FILLED_WRITES", "same_filled_writes", PAGES, "pages kept in the map as their fill word"),
    Definition("SAME_FILLED_READS", "same_filled_reads", PAGES, "pages read back from their fill word"),
    Definition("SAME_FILLED_STORE_DROPS", "same_filled_store_drops", PAGES,
               "store copies dropped because their page became same-filled"),
    Definition("FALLBACK_REFUSED", "fallback_refused", PAGES, "pages the store refused, sent to the backing file"),
    Definition("FALLBACK_TIMEOUT", "fallback_timeout", PAGES,
               "pages of batches the store did not answer within --write-timeout"),
    Definition("FALLBACK_UNREACHABLE", "fallback_unreachable", PAGES,
               "pages written while the store was unreachable"),
    Definition("FALLBACK_ERROR", "fallback_error", PAGES, "pages of batches the store answered with an error"),
    Definition("FALLBACK_STORE_LOST", "fallback_store_lost", PAGES,
               "pages accepted by a store that was gone before the write was done"),
    Definition("FALLBACK_HELD_OFF", "fallback_held_off", PAGES,
               "pages not offered: the store had refused a whole batch for pressure (--pressure-holdoff)"),
    *refusal_counters("pages the store refused"),
    Definition("STALE_DROPPED", "stale_dropped", PAGES, "pages whose store copy was superseded by a backing write"),
    Definition("ORPHAN_INVALIDATIONS", "orphan_invalidations", REQUESTS,
               "drop requests the store answered for batches that went to the backing file (timed out, "
               "failed, unreachable or held off) while it might hold a copy"),
    Definition("DISCARD_REQUESTS", "discard_requests", REQUESTS, "discards (freed swap slots)"),
    Definition("DISCARD_PAGES", "discard_pages", PAGES, "whole pages forgotten by the page map (they read as zeros)"),
    Definition("DISCARD_HOST_PAGES", "discard_host_pages", PAGES, "of those, pages the store dropped"),
    Definition("IO_ERRORS", "io_errors", REQUESTS, "FUSE requests answered with an error"),
    Definition("READ_FAILURES", "read_failures", PAGES, "pages that could not be produced (the read failed: EIO)"),
    Definition("CHECKSUM_ERRORS", "checksum_errors", PAGES,
               "pages whose version or checksum did not match the map (from the store, the backing file or "
               "a hand-back): refused, never returned"),
    Definition("PAGES_LOST", "pages_lost", PAGES, "pages marked lost: their only copy is gone"),
    Definition("LOST_READS", "lost_reads", PAGES, "reads of lost pages, failed at once"),
    Definition("BACKING_WRITE_ERRORS", "backing_write_errors", PAGES, "pages the backing file failed to take"),
    Definition("WRITETHROUGH_BACKING_READS", "writethrough_backing_reads", PAGES,
               "cached pages read from the backing file instead (write-through)"),
    Definition("HANDBACK_REQUESTS", "handback_requests", REQUESTS, "hand-backs received from the store"),
    Definition("HANDBACK_TAKEN", "handback_taken", PAGES, "pages the store handed back, now in the backing file"),
    Definition("HANDBACK_NOT_NEEDED", "handback_not_needed", PAGES, "handed back, but the map had moved on"),
    Definition("HANDBACK_FAILED", "handback_failed", PAGES,
               "handed back, but the backing file failed: left in the store"),
), "vswapfs's counters (`vswapctl stats`: the vswapfs section)")
REFUSAL_COUNTER = refusal_map(PagerCounter)


class BurstLog:
    """One log line per burst: the first event logs; the rest within ``interval``
    seconds are counted and summed up by the next line."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def error(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more like it since the last report)" if self._suppressed else ""
        self.logger.error(message + more, *args)
        self._last = now
        self._suppressed = 0
