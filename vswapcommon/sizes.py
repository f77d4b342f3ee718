"""Sizes as users write them: 4096, 64K, 512M, 1G, 2T (binary units)."""

from __future__ import annotations

PAGE_SIZE = 4096  # the unit of swap, of the wire and of every store

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError with a message naming the problem."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
