"""Helpers shared by the three command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type=`` from a parser that raises ValueError with a clear message,
    so the one-line error names the problem rather than 'invalid value'."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def percent(text: str) -> float:
    """A percentage in (0, 100]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage") from None
    if not 0 < value <= 100:
        raise ValueError(f"{text} is not within (0, 100]")
    return value
