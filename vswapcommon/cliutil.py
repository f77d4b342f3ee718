"""Helpers shared by the three command lines."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from .sizes import PAGE_SIZE, parse_size

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


def positive(text: str) -> float:
    """A number above 0 (seconds, rates)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{text} is not positive")
    return value


def non_negative(text: str) -> float:
    """A finite number, 0 or more (seconds, where 0 turns something off)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"{text} is not a finite number of 0 or more")
    return value


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < least:
        raise ValueError(f"{text} is not at least {least}")
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    return _whole(text, 1)


def cpu_number(text: str) -> int:
    """A CPU's number, 0 or more (as taskset and /proc/cpuinfo count them)."""
    return _whole(text, 0)


def quota(text: str) -> tuple[str | None, int]:
    """``NAME=SIZE`` or ``SIZE`` (the default quota): whole pages, zero allowed."""
    name, sep, size = text.rpartition("=")
    if sep and not name:
        raise ValueError(f"quota {text!r} has an empty client name")
    value = parse_size(size)
    if value % PAGE_SIZE:
        raise ValueError(f"quota {text!r} is not a multiple of {PAGE_SIZE}")
    return (name if sep else None), value
