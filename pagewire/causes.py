"""Why a page is refused, why pages are handed back, why ephemeral ones are dropped: each cause defined once.

The wire's status codes (:data:`PageStatus`), the counters both daemons keep by
cause and the maps between them are all built from the two tables here, so a
new cause is one line: a code, a name, what it means.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import NamedTuple

from vswapcommon.counters import CounterEnum, Definition, Unit


class Cause(NamedTuple):
    code: int  # the status byte on the wire (refusals); 0 for hand-back causes, which travel as names
    name: str
    description: str


REFUSAL_CAUSES = (
    Cause(1, "pressure", "the store's host was under memory pressure (above --high-watermark, and not yet back "
                         "under --low-watermark)"),
    Cause(2, "capacity", "the store held --capacity"),
    Cause(3, "quota", "the client held its quota (--quota)"),
    Cause(4, "outdated", "a newer version of the page was stored already"),
    Cause(6, "nomem", "the store could not allocate memory for the page (with a page tier: its node answered OOM)"),
    Cause(7, "draining", "the store was shutting down, handing pages back"),
    Cause(8, "share", "the store was nearly full and the client held its weighted share"),
    Cause(9, "policy", "the store's admission policy said no"),
    Cause(10, "policy_error", "the store's policy plug-in failed: refused, to be safe"),
    Cause(11, "replication", "the page tier: no replica acknowledged the page in time, or its master had too "
                               "few replicas in sync to send it at all"),
    Cause(12, "tier", "the page tier: the node for the page failed or could not be reached"),
)
HANDBACK_CAUSES = (
    Cause(0, "pressure", "the store's host was under memory pressure"),
    Cause(0, "drain", "the store was draining (shutting down)"),
    Cause(0, "replication", "the page tier: their master had no replica in sync"),
)
# An ephemeral pool's pages (``messages.POOL_EPHEMERAL``) are never handed back: the store
# drops them, asking no one and writing nothing, and counts why.
DROP_CAUSES = (
    Cause(0, "pressure", "the store's host was under memory pressure: ephemeral pages go first, before any "
                         "swap page is handed back"),
    Cause(0, "capacity", "room for newer pages, of any pool, at --capacity (the least recently used first)"),
    Cause(0, "quota", "room for newer pages of the same client at its quota (its least recently used first)"),
    Cause(0, "drain", "the store was draining (shutting down): ephemeral pages are not handed back"),
)
STORED, MISSING = 0, 5

# One byte per page in a put or get answer: stored, missing (get), or why refused (put).
PageStatus = enum.IntEnum("PageStatus", sorted(
    [("STORED", STORED), ("MISSING", MISSING)] + [(f"REFUSED_{c.name.upper()}", c.code) for c in REFUSAL_CAUSES],
    key=lambda item: item[1]))
HandBackCause = enum.StrEnum("HandBackCause", [(c.name.upper(), c.name) for c in HANDBACK_CAUSES])
DropCause = enum.StrEnum("DropCause", [(c.name.upper(), c.name) for c in DROP_CAUSES])
REFUSALS = frozenset(PageStatus[f"REFUSED_{c.name.upper()}"] for c in REFUSAL_CAUSES)


def refusal_counters(whose: str) -> Iterator[Definition]:
    """One counter per refusal cause, named ``refused_<cause>``; ``whose`` begins each description."""
    for c in REFUSAL_CAUSES:
        yield Definition(f"REFUSED_{c.name.upper()}", f"refused_{c.name}", Unit.PAGES, f"{whose}: {c.description}",
                         reason=c.name)


def handback_counters() -> Iterator[Definition]:
    """One counter per hand-back cause, named ``handed_back_<cause>``: pages freed once the client took them."""
    for c in HANDBACK_CAUSES:
        yield Definition(f"HANDED_BACK_{c.name.upper()}", f"handed_back_{c.name}", Unit.PAGES,
                         f"pages freed after the client took them back: {c.description}")


def drop_counters() -> Iterator[Definition]:
    """One counter per drop cause, named ``dropped_<cause>``: ephemeral pages the store let go."""
    for c in DROP_CAUSES:
        yield Definition(f"DROPPED_{c.name.upper()}", f"dropped_{c.name}", Unit.PAGES,
                         f"ephemeral pages dropped: {c.description}")


def refusal_map(counters: type[CounterEnum]) -> dict[int, CounterEnum]:
    """Each refusal status to its counter in ``counters`` (made by :func:`refusal_counters`)."""
    return {PageStatus[f"REFUSED_{c.name.upper()}"]: counters[f"REFUSED_{c.name.upper()}"] for c in REFUSAL_CAUSES}


def handback_map(counters: type[CounterEnum]) -> dict[str, CounterEnum]:
    """Each hand-back cause to its counter in ``counters`` (made by :func:`handback_counters`)."""
    return {HandBackCause[c.name.upper()]: counters[f"HANDED_BACK_{c.name.upper()}"] for c in HANDBACK_CAUSES}


def drop_map(counters: type[CounterEnum]) -> dict[str, CounterEnum]:
    """Each drop cause to its counter in ``counters`` (made by :func:`drop_counters`)."""
    return {DropCause[c.name.upper()]: counters[f"DROPPED_{c.name.upper()}"] for c in DROP_CAUSES}
