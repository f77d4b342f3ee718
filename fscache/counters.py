"""What the cache counts, defined once (names, units, descriptions: docs/counters.md is made from them)."""

from __future__ import annotations

from vswapcommon.counters import Definition, Unit, define

PAGES, REQUESTS, EVENTS = Unit.PAGES, Unit.REQUESTS, Unit.EVENTS

CacheCounter = define("CacheCounter", (
    Definition("READ_REQUESTS", "read_requests", REQUESTS, "reads through the mount (FUSE read requests)"),
    Definition("WRITE_REQUESTS", "write_requests", REQUESTS, "writes through the mount (FUSE write requests)"),
    Definition("HOST_HITS", "host_hits", PAGES, "pages served from the store, version and checksum checked"),
    Definition("SHARED_HITS", "shared_hits", PAGES,
               "of those, copied straight from memory the store shares with us (no round trip)"),
    Definition("HOST_MISSES", "host_misses", PAGES,
               "whole pages the cache had no usable store copy of (never offered, refused, dropped, "
               "or invalidated): read from LOWER"),
    Definition("STALE_COPIES", "stale_copies", PAGES,
               "store copies whose version or checksum did not match: a miss, never data"),
    Definition("LOWER_PAGES_READ", "lower_pages_read", PAGES, "pages read from LOWER to answer reads"),
    Definition("LOWER_PAGES_WRITTEN", "lower_pages_written", PAGES, "pages (whole or in part) written to LOWER"),
    Definition("HOST_OFFERED", "host_offered", PAGES, "whole pages read from LOWER and offered to the store"),
    Definition("HOST_STORED", "host_stored", PAGES, "of those, pages the store took"),
    Definition("HOST_REFUSED", "host_refused", PAGES, "of those, pages the store refused (any cause)"),
    Definition("OFFER_FAILED", "offer_failed", PAGES,
               "pages not offered after all: the store was unreachable, answered an error or too late, "
               "or had been too late within the last five --store-timeouts"),
    Definition("OFFER_RACED", "offer_raced", PAGES,
               "pages the store took but the cache did not keep: the file changed while they were offered"),
    Definition("INVALIDATED_PAGES", "invalidated_pages", PAGES,
               "cached pages forgotten because their file changed (writes, truncates, fallocate, unlink or "
               "rename over it through the mount, or changes made to LOWER behind the mount's back)"),
    Definition("EVICTED_PAGES", "evicted_pages", PAGES,
               "cached pages forgotten to reuse their slot (the cache's slots are a ring, oldest first)"),
    Definition("LOWER_CHANGES", "lower_changes", EVENTS,
               "files found changed behind the mount's back (size, mtime, ctime or generation) at open"),
    Definition("STORE_LOST", "store_lost", EVENTS, "times the store no longer held our pages (it restarted)"),
    Definition("IO_ERRORS", "io_errors", REQUESTS, "FUSE requests answered with an error other than the "
                                                  "lower filesystem's own"),
), "The FS-cache's counters (vswapctl stats, `cache` section).")
