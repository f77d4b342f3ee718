"""``docs/counters.md``, generated from the counters' definitions.

``python -m vswapctl.counterdoc`` prints it; ``--write`` rewrites the file.
tests/test_counterdoc.py fails when the document and the definitions differ.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from fscache.counters import CacheCounter
from hoststore.hostcounters import HostCounter
from hoststore.tiercounters import TierCounter
from pagewire.causes import DROP_CAUSES, HANDBACK_CAUSES, REFUSAL_CAUSES
from vswapcommon.counters import CounterEnum
from vswapfs.linkcounters import LinkCounter
from vswapfs.pagemap import STATE_NAMES
from vswapfs.pagercounters import PagerCounter

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "counters.md"
SECTIONS: tuple[type[CounterEnum], ...] = (PagerCounter, LinkCounter, HostCounter, TierCounter, CacheCounter)

_HEAD = """\
# Counters

Every counter the daemons report, by cause: its name in `vswapctl stats --json`
(and `MOUNTPOINT/stats`), what it counts, and what it means.  This file is
generated from the definitions in the code (`python -m vswapctl.counterdoc
--write`); a test fails when the two differ.

In Prometheus (`--metrics`), a counter is `vswap_pager_<name>`,
`vswap_store_<name>` or (the FS-cache's) `vswap_cache_<name>`, with `_pages` or `_connections` appended when it counts
those, and `_total`; the `refused_*` counters are one family,
`..._refused_pages_total{reason="..."}`.  A store's per-client counters carry a
`client` label (`vswap_store_client_...`).
"""


# What the daemons report beside their counters: their state now (gauges, settings).
STORE_STATE = {
    "instance": "this store instance's id (a new one at each start)",
    "pid": "the daemon's process id",
    "pages_stored": "pages held now, all clients together",
    "ephemeral_pages": "of those, the pages of ephemeral pools (which the store may drop at any time: "
                       "docs/architecture.md)",
    "bytes_stored": "their bytes",
    "slab_bytes_mapped": ("memory mapped for page data (it follows the pages held; with shared memory, each "
                          "client's counts up to one 4 MiB chunk ahead of its pages, populated ahead of need "
                          "or kept spare: docs/shared-memory.md)"),
    "capacity_pages": "--capacity, in pages",
    "quota_pages": "the default quota, in pages (null: none)",
    "under_pressure": "true while the store refuses pages for memory pressure (between the watermarks' hysteresis)",
    "policy": "the admission policy (docs/policies.md)",
    "draining": "true once a drain started: pages are refused and handed back",
    "used_percent": "the host's used memory, as the last pressure sample saw it",
    "high_percent": "--high-watermark",
    "low_percent": "--low-watermark",
    "pressure_samples": "pressure samples taken (at most one per --pressure-interval)",
    "connections_active": "connections open now",
    "pressure_risks": "what keeps the daemon from being safe under machine-wide memory pressure (empty: nothing)",
    "log_lines_dropped": "log lines dropped because the log could not keep up (the daemon never waits for it)",
    "compression": "with --compress: the algorithm, `orig_data_bytes` (pages held, as pages), `compr_data_bytes` "
                   "(their compressed bytes), `mem_used_bytes` (memory the size classes hold), `charged_bytes` "
                   "(what --capacity and quotas count), `incompressible_pages` (held as they are), `ratio` "
                   "(orig_data_bytes / mem_used_bytes), `compress_seconds`, `decompress_seconds`; each client "
                   "has the same fields but the times",
    "fullest": "`data_bytes`: the most page data held so far, `mem_bytes`: the memory it took then, or once the "
               "compressor had caught up with it (the slab's chunks; with --compress, exactly what the size classes "
               "hold), `mem_used_max_bytes`: the most that memory ever was",
    "tier": "the page tier's counters and state, on a store with --tier",
    "clients": "per client: its pool (`swap` or `ephemeral`), counters, pages, quota, weight, share, lent pages "
               "and memory (all clients for an admin, a pager's own otherwise)",
}
PAGER_STATE = {
    "device_bytes": "the device's size", "device_pages": "the same in pages",
    "writethrough": "true with --writethrough",
    "pages_<state>": "device pages by where they live now, one field per state: "
                     + ", ".join(f"`pages_{name}`" for name in STATE_NAMES.values()),
    "host_connected": "true while the store is reachable", "orphans_pending": "drop requests not yet sent",
    "pressure_risks": "what keeps vswapfs from being safe under machine-wide memory pressure (empty: nothing)",
    "log_lines_dropped": "log lines dropped (vswapfs never waits for its log)",
    "inproc_store": "with --host inproc: the in-process store's own stats (as a store daemon's)",
    "host_address": "the store's address", "shared_memory": "true while pages are read from shared memory",
    "backing_file": "the backing file's path", "pid": "vswapfs's process id",
    "swap_opens": "opens of the swap file now (the loop device holds one)",
    "discard_supported": "false with a pyfuse3 without the fallocate patch",
    "fuse_splice_read": "whether FUSE requests are read with splice(2) (false with the splice patch)",
}


CACHE_STATE = {
    "slots": "the pages of file data the cache can keep track of (fscache --size, in pages)",
    "cached_pages": "file pages the cache names in the store now (the store may have dropped some since)",
    "files_known": "files the cache keeps a record of (open, or with pages named)",
    "host_pages": "the pages of this cache the store holds, as it last said (asked once a second)",
    "dropped_pages": "the store's `dropped_<cause>` counters for this cache, by cause, as it last said",
}
FSCACHE_STATE = {
    "pid": "fscache's process id", "lower": "LOWER", "mountpoint": "the mount point",
    "host_address": "the store's address", "host_connected": "true while the store is reachable",
    "shared_memory": "true while pages are read from memory the store shares",
    "open_files": "files open through the mount now", "known_inodes": "inodes the kernel knows through the mount",
    "inproc_store": "with --host inproc: the in-process store's own stats",
    "log_lines_dropped": "log lines dropped (fscache never waits for its log)",
}


def _state(title: str, fields: dict[str, str]) -> list[str]:
    rows = ["", f"## {title}", "", "| field | meaning |", "|---|---|"]
    return rows + [f"| `{name}` | {meaning} |" for name, meaning in fields.items()]


def _table(counters: type[CounterEnum]) -> list[str]:
    rows = ["| counter | counts | meaning |", "|---|---|---|"]
    rows += [f"| `{c.value}` | {c.unit.value} | {c.description} |" for c in counters]
    return rows


def _causes() -> list[str]:
    rows = ["## Why a page is refused", "",
            "The status byte a store answers for each page it refuses, and the cause both daemons count "
            "(`refused_<cause>`):", "", "| code | cause | meaning |", "|---|---|---|"]
    rows += [f"| {c.code} | `{c.name}` | {c.description} |" for c in REFUSAL_CAUSES]
    rows += ["", "## Why pages are handed back", "", "| cause | meaning |", "|---|---|"]
    rows += [f"| `{c.name}` | {c.description} |" for c in HANDBACK_CAUSES]
    rows += ["", "## Why ephemeral pages are dropped", "",
             "An ephemeral pool's pages are never handed back: the store drops them, asking no one and writing "
             "nothing, and counts why (`dropped_<cause>`):", "", "| cause | meaning |", "|---|---|"]
    rows += [f"| `{c.name}` | {c.description} |" for c in DROP_CAUSES]
    return rows


def render() -> str:
    lines = [_HEAD]
    lines += _causes()
    for counters in SECTIONS:
        lines += ["", f"## {counters.__doc__}", ""]
        lines += _table(counters)
    lines += _state("vswapfs's state, beside its counters", PAGER_STATE)
    lines += _state("hoststore's state, beside its counters", STORE_STATE)
    lines += _state("The FS-cache's state, in its `cache` section beside its counters", CACHE_STATE)
    lines += _state("fscache's other figures (`vswapctl stats`: the `fscache` section), beside the link "
                    "counters above", FSCACHE_STATE)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vswapctl.counterdoc", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite {DOC} instead of printing it")
    args = ap.parse_args(argv)
    if args.write:
        DOC.write_text(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
