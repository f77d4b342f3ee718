"""One logging setup for every command: stderr, ``-v`` for debug."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable


def setup_logging(verbose: bool, name: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{name}[%(process)d] %(levelname)s %(message)s",
    )


class RateLimited:
    """At most ``burst`` lines per ``interval`` seconds for each kind of event; the
    rest are counted and summed up in the next line let through.  Hostile peers
    opening connections by the thousand must not turn the log (and the daemon's
    time) into theirs."""

    def __init__(self, log: logging.Logger, burst: int = 10, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.burst, self.interval, self.clock = log, burst, interval, clock
        self._window: dict[str, tuple[float, int, int]] = {}  # kind -> (start, lines, suppressed)

    def __call__(self, kind: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = self.clock()
        start, lines, suppressed = self._window.get(kind, (now, 0, 0))
        if now - start >= self.interval:
            start, lines = now, 0
        if lines >= self.burst:
            self._window[kind] = (start, lines, suppressed + 1)
            return
        if suppressed:
            msg += f" ({suppressed} more like this were not logged)"
        self._window[kind] = (start, lines + 1, 0)
        self.log.log(level, msg, *args, exc_info=exc_info)
