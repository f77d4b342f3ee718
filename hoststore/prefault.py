"""Shared page memory given its pages ahead of need, off the event loop.

The first write to a page of a memfd costs the kernel an allocation, a zeroing
and, with the daemon's ``mlockall``, a lock: 6–7 µs a page in the store during
swap-out, against 0.5 µs for a copy into a page already there.  A put copies
its pages into the client's memfd on the event loop, so that first touch was
most of the time a put took to serve, and every put queued behind it waited
for it (docs/benchmarks.md, "Where a put's round trip goes").  So a shared
slab whose last page is halfway into its chunk asks for the next chunk to be
populated (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14) by one worker thread:
ctypes lets go of the GIL for the call, and the loop serves on.

The rules (``SharedSlab`` keeps its side of them):

* what is populated is counted in the slab's ``mapped_bytes`` from the moment
  it is asked for, and it is the chunk ``shrink`` keeps as its spare;
* the worker populates a piece (:data:`PIECE_PAGES`) at a time, holding that
  slab's lock, and only while the piece is still counted and the slab open;
  a slab giving memory back, or closing, takes its lock first (waiting for at
  most the piece in progress: the worker starts no piece of a slab that waits
  for it), so nothing is populated after it was given back or unmapped;
* one request pending per slab (its latest), holding no reference that keeps
  a slab alive;
* populating never changes what a page holds; any failure costs only speed
  (pages are then allocated by the copy, as before), and a kernel without
  ``MADV_POPULATE_WRITE`` turns it off for good.

The worker thread starts with the first request, from the event loop's
thread, after the daemon hardened itself (``vswapcommon.hardening``): it
inherits what that set, per-thread settings such as ``PR_SET_IO_FLUSHER``
included, by being created from that thread then.  The store never forks; a
child forked anyway gets fresh locks and no worker (so that it cannot hang on
a lock the worker held), not a right to touch the memfds, which it shares
with the store.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from pagewire.messages import PAGE_SIZE

from .memfd import populate_write

log = logging.getLogger("hoststore")

PIECE_PAGES = 16  # populated under the slab's lock at a time (64 KiB: ~0.1 ms here)

Madvise = Callable[[int, int], int]  # (address, length) -> 0, or an errno


class Target(Protocol):
    """What the worker needs of a slab (``SharedSlab``)."""

    lock: threading.Lock
    waiting: int  # threads waiting for ``lock``; changed under the prefaulter's condition

    def populatable(self, offset: int, length: int) -> int | None:
        """Called with ``lock`` held: the address of data bytes ``offset ..`` if they may
        be populated now (the slab is open and counts them), else None."""
        ...


class Prefaulter:
    """One worker thread for the whole store, taking slabs' requests in order."""

    def __init__(self, madvise: Madvise = populate_write) -> None:
        self.madvise = madvise
        self.enabled = True
        self.populated_bytes = 0  # what the worker populated (for tests and curiosity)
        self._jobs: collections.OrderedDict[int, tuple[weakref.ref[Target], int, int]] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def ask(self, target: Target, offset: int, length: int) -> bool:
        """Populate data bytes ``offset .. offset + length`` of ``target``, some time
        soon, in place of any request of its still pending; whether it was taken
        (not when populating is off).  Never raises."""
        if not self.enabled:
            return False
        with self._cond:
            self._jobs.pop(id(target), None)
            self._jobs[id(target)] = (weakref.ref(target), offset, length)
            self._cond.notify_all()  # the worker, and whoever waits for it (wait_idle)
            if self._thread is None:
                try:
                    thread = threading.Thread(target=self._run, name="hoststore-prefault", daemon=True)
                    thread.start()
                except RuntimeError as exc:  # no thread to be had (a pids limit): only speed is lost
                    self.enabled = False
                    self._jobs.clear()
                    log.warning("no thread to populate memory ahead (%s): pages are allocated as they are "
                                "written", exc)
                    return False
                self._thread = thread
        return True

    def out_of_the_way(self, target: Target) -> _Held:
        """Held, the worker is in none of ``target``'s memory and enters none."""
        return _Held(self, target)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every request is done (tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def forget_worker(self) -> None:
        """In a forked child: the worker did not come along, and its locks may be held."""
        self._cond = threading.Condition()
        self._jobs.clear()
        self._busy = False
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._jobs))
                _, (ref, offset, length) = self._jobs.popitem(last=False)
                self._busy = True
            target = ref()
            if target is None:
                continue
            try:
                self._populate(target, offset, length)
            except Exception:  # noqa: BLE001 - a bug here must cost only speed: pages are touched by the copy
                log.exception("populating shared page memory ahead failed; the pages will be touched as they come")
            del target

    def _populate(self, target: Target, offset: int, length: int) -> None:
        piece = PIECE_PAGES * PAGE_SIZE
        for at in range(offset, offset + length, piece):
            size = min(piece, offset + length - at)
            with self._cond:  # a slab waiting for its lock goes first
                self._cond.wait_for(lambda: not target.waiting)
            with target.lock:
                address = target.populatable(at, size)
                if address is None:
                    return  # given back or closed meanwhile: nothing more of it is wanted
                err = self.madvise(address, size)
            if err:
                self._failed(err)
                return
            self.populated_bytes += size

    def _failed(self, err: int) -> None:
        if err in (errno.EINVAL, errno.ENOSYS):
            self.enabled = False
            log.info("this kernel cannot populate memory ahead (MADV_POPULATE_WRITE: %s): pages are allocated "
                     "as they are written", errno.errorcode.get(err, err))
        else:  # ENOMEM, EFAULT, EINTR...: this request stops, the next may do better
            log.debug("populating shared page memory ahead stopped: %s", errno.errorcode.get(err, err))


class _Held:
    """:meth:`Prefaulter.out_of_the_way`: counted as waiting, then the slab's lock."""

    def __init__(self, prefault: Prefaulter, target: Target) -> None:
        self.prefault, self.target = prefault, target

    def __enter__(self) -> None:
        with self.prefault._cond:
            self.target.waiting += 1
        try:
            self.target.lock.acquire()
        except BaseException:
            self._not_waiting()
            raise

    def _not_waiting(self) -> None:
        with self.prefault._cond:
            self.target.waiting -= 1
            self.prefault._cond.notify_all()

    def __exit__(self, *exc: object) -> None:
        self.target.lock.release()
        self._not_waiting()


PREFAULTER = Prefaulter()  # the store's one worker
os.register_at_fork(after_in_child=PREFAULTER.forget_worker)
