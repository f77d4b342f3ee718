"""``docs/counters.md``, generated from the counters' definitions.

``python -m vswapctl.counterdoc`` prints it; ``--write`` rewrites the file.
tests/test_counterdoc.py fails when the document and the definitions differ.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from hoststore.hostcounters import HostCounter
from hoststore.tiercounters import TierCounter
from pagewire.causes import HANDBACK_CAUSES, REFUSAL_CAUSES
from vswapcommon.counters import CounterEnum
from vswapfs.linkcounters import LinkCounter
from vswapfs.pagercounters import PagerCounter

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "counters.md"
SECTIONS: tuple[type[CounterEnum], ...] = (PagerCounter, LinkCounter, HostCounter, TierCounter)

_HEAD = """\
# Counters

Every counter the daemons report, by cause: its name in `vswapctl stats --json`
(and `MOUNTPOINT/stats`), what it counts, and what it means.  This file is
generated from the definitions in the code (`python -m vswapctl.counterdoc
--write`); a test fails when the two differ.

In Prometheus (`--metrics`), a counter is `vswap_pager_<name>` or
`vswap_store_<name>`, with `_pages` or `_connections` appended when it counts
those, and `_total`; the `refused_*` counters are one family,
`..._refused_pages_total{reason="..."}`.  A store's per-client counters carry a
`client` label (`vswap_store_client_...`).
"""


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
    return rows


def render() -> str:
    lines = [_HEAD]
    lines += _causes()
    for counters in SECTIONS:
        lines += ["", f"## {counters.__doc__}", ""]
        lines += _table(counters)
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
