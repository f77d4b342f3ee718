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


DEFINED: dict[str, type[CounterEnum]] = {}  # every counter enum, by its name, in the order defined


def define(enum_name: str, definitions: Iterable[Definition], doc: str) -> type[CounterEnum]:
    """A counter enum from its definitions (each name once); ``doc`` says whose counters they are."""
    defs = list(definitions)
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise ValueError(f"{enum_name}: a counter is defined twice")
    made = CounterEnum(enum_name, [(d.member, (d.name, d.unit, d.description, d.reason)) for d in defs])
    made.__doc__ = doc
    DEFINED[enum_name] = made
    return made


def _find(name: str) -> CounterEnum | None:
    for counters in DEFINED.values():
        member = counters._value2member_map_.get(name)
        if member is not None:
            return member  # type: ignore[return-value]
    return None


def unit_of(name: str) -> Unit | None:
    """The unit of the counter users see as ``name``, in whichever enum defines it."""
    member = _find(name)
    return None if member is None else member.unit


def description_of(name: str) -> str | None:
    member = _find(name)
    return None if member is None else member.description


def reason_of(name: str) -> str | None:
    """The refusal reason a counter stands for, if it is one of the refused-pages family."""
    member = _find(name)
    return None if member is None else member.reason


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
