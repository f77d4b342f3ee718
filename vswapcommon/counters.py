"""Counters keyed by an enum of causes, as zswap and zram count by cause.

Each daemon declares its causes once, with :func:`define`: per counter the name
users see (``vswapctl stats``), its unit and a one-line description.  Code adds
to a cause, never to a name spelled out again; the metrics take each counter's
unit from here, and ``docs/counters.md`` is generated from these definitions
(``python -m vswapctl.counterdoc``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar


class Unit(enum.StrEnum):
    """What a counter counts (the metric name carries it for pages and connections)."""

    PAGES = "pages"
    REQUESTS = "requests"
    CONNECTIONS = "connections"
    EVENTS = "events"


class Definition(NamedTuple):
    """One counter: ``member`` in code, ``name`` for users.  ``reason``: the counter is one
    reason of the refused-pages family (the metrics give it a ``reason`` label)."""

    member: str
    name: str
    unit: Unit
    description: str
    reason: str | None = None


class CounterEnum(enum.StrEnum):
    """A daemon's counter causes; each member knows its unit and description."""

    unit: Unit
    description: str
    reason: str | None

    def __new__(cls, name: str, unit: Unit, description: str, reason: str | None) -> CounterEnum:
        member = str.__new__(cls, name)
        member._value_ = name
        member.unit = unit
        member.description = description
        member.reason = reason
        return member


def define(enum_name: str, definitions: Iterable[Definition], doc: str) -> type[CounterEnum]:
    """A counter enum from its definitions (each name once); ``doc`` says whose counters they are."""
    defs = list(definitions)
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise ValueError(f"{enum_name}: a counter is defined twice")
    made = CounterEnum(enum_name, [(d.member, (d.name, d.unit, d.description, d.reason)) for d in defs])
    made.__doc__ = doc
    return made


def index(*enums: type[CounterEnum]) -> dict[str, CounterEnum]:
    """Every counter of these enums, by the name users see (a name in two of them
    must mean the same: same unit, same refusal reason)."""
    found: dict[str, CounterEnum] = {}
    for counters in enums:
        for counter in counters:
            other = found.setdefault(counter.value, counter)
            if (other.unit, other.reason) != (counter.unit, counter.reason):
                raise ValueError(f"counter {counter.value!r} means two things")
    return found


C = TypeVar("C", bound=enum.StrEnum)


class Counters(Generic[C]):
    __slots__ = ("_values",)

    def __init__(self, causes: type[C]) -> None:
        self._values: dict[C, int] = dict.fromkeys(causes, 0)

    def add(self, cause: C, n: int = 1) -> None:
        self._values[cause] += n

    def __getitem__(self, cause: C) -> int:
        return self._values[cause]

    def as_dict(self) -> dict[str, int]:
        return {cause.value: n for cause, n in self._values.items()}
