"""Keep a daemon on the swap path out of swap and alive under memory pressure.

A daemon that serves swap must never wait for its own pages to come back
from swap, and must not be the OOM killer's choice (nbd-client ``-swap`` does
the same).  Each step may fail for lack of privilege (root without
CAP_SYS_RESOURCE cannot lower oom_score_adj nor set PR_SET_IO_FLUSHER): the
daemon then warns once, naming what it could not do, and goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_IO_FLUSHER = 57

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def lock_memory() -> str | None:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT); None on success, else the problem.

    MCL_ONFAULT locks pages as they are touched instead of populating every
    mapping at once: the store's slab and thread stacks would otherwise be
    made resident in full the moment they are mapped.  Kernels before 4.4
    lack it, and get plain MCL_CURRENT | MCL_FUTURE.
    """
    for flags in (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, MCL_CURRENT | MCL_FUTURE):
        if _libc.mlockall(flags) == 0:
            return None
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
    return f"mlockall: {os.strerror(err)}"


def protect_from_oom(path: str = "/proc/self/oom_score_adj") -> str | None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"-1000")  # the error, if any, comes from this write: checked
        finally:
            os.close(fd)
    except OSError as exc:
        return f"oom_score_adj -1000: {exc.strerror}"
    return None


def set_io_flusher() -> str | None:
    """PR_SET_IO_FLUSHER: our allocations must not recurse into the I/O we serve."""
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        return f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())}"
    return None


def harden(log: logging.Logger) -> list[str]:
    """Apply all three; warn once about what could not be set.  Returns the problems."""
    problems = [p for p in (lock_memory(), protect_from_oom(), set_io_flusher()) if p]
    if problems:
        log.warning(
            "running without full swap-path protection (%s)%s",
            "; ".join(problems),
            "" if os.geteuid() == 0 else ": not root",
        )
    return problems
