"""A memory cgroup for a workload: v1 (``memory.limit_in_bytes``) or v2 (``memory.max``).

Only the workload goes in it, never the daemons: a daemon serving swap must
not itself be pushed to swap.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


class CgroupUnavailable(Exception):
    """No memory cgroup can be made here; the message says why."""


@dataclass
class MemoryCgroup:
    path: str
    version: int

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def run(self, argv: Sequence[str], timeout: float | None = None, cpus: set[int] | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the cgroup (it joins before exec), on ``cpus`` only if given,
        capturing its output as text unless ``kwargs`` (subprocess.run's) say otherwise."""
        procs = self.procs

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        if not any(k in kwargs for k in ("stdout", "stderr", "capture_output")):
            kwargs["capture_output"] = True
        kwargs.setdefault("text", True)
        return subprocess.run(argv, preexec_fn=join, timeout=timeout, **kwargs)

    def remove(self, wait: float = 10.0) -> None:
        """rmdir, retrying while the last tasks finish exiting."""
        deadline = time.monotonic() + wait
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _v2_root() -> str | None:
    for root in V2_ROOTS:
        try:
            with open(os.path.join(root, "cgroup.controllers")) as f:
                if "memory" in f.read().split():
                    return root
        except OSError:
            continue
    return None


def leave_memory_limit() -> None:
    """Move the calling process to the root memory cgroup (v1 memory hierarchy, or
    v2), where no limit applies.  Best effort: as non-root, or where the root is
    not writable, nothing changes."""
    for root in (V1_ROOT, *V2_ROOTS):
        procs = os.path.join(root, "cgroup.procs")
        if root != V1_ROOT and not os.path.exists(os.path.join(root, "cgroup.controllers")):
            continue
        try:
            _write(procs, str(os.getpid()))
        except OSError:
            continue
        return


def detect() -> tuple[int, str]:
    """(version, root) of a usable memory controller, or CgroupUnavailable."""
    if os.geteuid() != 0:
        raise CgroupUnavailable("making a memory cgroup needs root")
    if os.path.exists(os.path.join(V1_ROOT, "memory.limit_in_bytes")):
        return 1, V1_ROOT
    root = _v2_root()
    if root:
        return 2, root
    raise CgroupUnavailable("no cgroup v1 memory controller and no cgroup v2 with the memory controller")


def create(name: str, limit_bytes: int) -> MemoryCgroup:
    version, root = detect()
    path = os.path.join(root, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    cg = MemoryCgroup(path, version)
    try:
        if version == 1:
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limit_bytes))
        else:
            try:
                _write(os.path.join(root, "cgroup.subtree_control"), "+memory")
            except OSError:
                pass  # already on, or set by whoever manages the root
            _write(os.path.join(path, "memory.max"), str(limit_bytes))
    except OSError as exc:
        cg.remove()
        raise CgroupUnavailable(f"cannot set the memory limit in {path}: {exc.strerror}") from None
    return cg
