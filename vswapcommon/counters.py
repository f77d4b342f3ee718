"""Counters keyed by an enum of causes, as zswap and zram count by cause.

Each daemon declares its causes once as a ``StrEnum`` whose values are the
counter names users see (``vswapctl stats``); code adds to a cause, never to a
name spelled out again.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

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
