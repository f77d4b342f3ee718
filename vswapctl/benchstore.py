"""A throwaway hoststore process for the benchmarks (``microbench``, ``attack``).

It listens on a unix socket in a private temporary directory and is stopped
with SIGTERM (it drains; the benchmarks release their pages first, so there is
nothing to hand back), then a second SIGTERM (exit at once), then SIGKILL.
No swap is ever on it, so stopping it can cost no process a page.  It runs
isolated, in / (``vswapctl.launch``): nothing from the caller's directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import launch


@contextmanager
def bench_store(prefix: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """(the store process, its socket path, the private work directory), until the block ends."""
    workdir = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    sock = os.path.join(workdir, "host.sock")
    store = launch.popen("hoststore", "--listen", f"unix:{sock}", *args,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if store.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hoststore did not start")
            time.sleep(0.02)
        yield store, sock, workdir
    finally:
        for stop in (store.terminate, store.terminate, store.kill):
            stop()
            try:
                store.wait(30)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(workdir, ignore_errors=True)
