"""One logging setup for every command: stderr, ``-v`` for debug; and, for the two
daemons, output they never wait for."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20  # what output may pile up before lines are dropped
EXIT_WAIT = 2.0  # seconds an exiting daemon gives its last lines to reach the log file


def setup_logging(verbose: bool, name: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{name}[%(process)d] %(levelname)s %(message)s",
    )


class _DroppingStream:
    """A text stream onto a non-blocking pipe: a write that does not fit now is dropped
    and counted, never waited for."""

    def __init__(self, fd: int, output: "Output") -> None:
        self._fd = fd
        self._output = output

    def write(self, text: str) -> int:
        data = text.encode(errors="replace")
        try:
            written = os.write(self._fd, data)
        except (BlockingIOError, BrokenPipeError):
            written = 0
        if written < len(data):
            self._output.dropped += 1
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False


class Output:
    """A daemon's stdout and stderr, through a pipe that a thread of its own copies to
    where they went (the log file ``vswapctl up`` gave it).

    A daemon serving swap must never wait for its own log: the log file is often on
    tmpfs (``/run``), whose pages can be swapped out, to the very device the daemon
    serves; appending to such a page waits for its swap-in, which waits for the daemon
    (seen in a VM under machine-wide pressure: the store's main thread in
    ``shmem_swapin_folio`` from ``write(2)``).  Now only the copying thread ever waits;
    what does not fit in the pipe meanwhile is dropped, and counted (``dropped``).
    C code writing to fd 1 or 2 gets EAGAIN instead of blocking."""

    def __init__(self) -> None:
        self.dropped = 0  # lines (writes) that found the pipe full, and chunks the log file refused
        self.started = False

    def start(self) -> None:
        target = os.dup(2)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the default 64 KiB: more lines dropped in a stall, nothing worse
        os.set_blocking(write_end, False)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._target = target
        self._copier = threading.Thread(target=_copy, args=(read_end, target, self), name="output", daemon=True)
        self._copier.start()
        sys.stdout = _DroppingStream(1, self)  # type: ignore[assignment]
        sys.stderr = _DroppingStream(2, self)  # type: ignore[assignment]
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
        self.started = True
        atexit.register(self.finish, EXIT_WAIT)

    def finish(self, wait: float) -> None:
        """At exit: the last lines (the drain's report, say) are copied out, for at most
        ``wait`` seconds; fd 1 and 2 go straight to the log file again."""
        os.dup2(self._target, 1)  # the pipe's last write ends close: the copier sees its end
        os.dup2(self._target, 2)
        self._copier.join(wait)


def _copy(read_end: int, target: int, output: "Output | None" = None, retry_after: float = 1.0) -> None:
    """The one place that may wait for the log file.  A write that fails (a full disk)
    loses that chunk, counted as one drop, not the log: the copier goes on with the next."""
    while data := os.read(read_end, 1 << 16):
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(target, view):]
            except OSError:
                if output is not None:
                    output.dropped += 1
                time.sleep(retry_after)  # meanwhile the pipe fills, and the daemon drops and counts
                break


OUTPUT = Output()  # the daemon's, once started


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
