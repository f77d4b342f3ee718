"""One controller per cgroup, and a limit a dead controller left behind put back.

While a controller runs it holds an exclusive ``flock`` on a small file under
``/run/vswapctl`` named after the cgroup, in which it keeps the limit it found
and the limit it last wrote.  A second controller for the same cgroup finds
the lock taken and refuses.  A controller that died without its ``finally``
(SIGKILL, a power cut of the process) leaves the file behind, unlocked: the
next one to start on that cgroup finds it, and if the limit is still the one
the dead controller wrote, puts back the limit that one had found.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from typing import Any

RUN_DIR = "/run/vswapctl"


def default_run_dir() -> str:
    """Where claims live: /run/vswapctl as root; otherwise (a cgroup v2 subtree delegated
    to a user) the user's runtime directory."""
    if os.geteuid() == 0:
        return RUN_DIR
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vswapctl-{os.geteuid()}"
    return os.path.join(base, "vswapctl")


class Claimed(Exception):
    """Another controller runs on this cgroup; the message says which."""


class Claim:
    def __init__(self, cgroup_path: str, run_dir: str | None = None) -> None:
        self.cgroup = os.path.realpath(cgroup_path)
        digest = hashlib.sha256(self.cgroup.encode()).hexdigest()[:16]
        self.path = os.path.join(run_dir or default_run_dir(), f"offload-{digest}.json")
        self.fd = -1
        self.left: dict[str, Any] | None = None  # what a dead controller left, if anything

    def left_behind(self, limit: int) -> str | None:
        """The limit a dead controller had found, if ``limit`` is one it wrote or was writing."""
        left = self.left
        if not left or not left.get("found"):
            return None
        found = str(left["found"])
        if found != "max" and not found.isdigit():
            return None  # not a limit the kernel wrote: nothing of ours
        written = {left.get("ours"), left.get("pending")} - {None}
        return found if limit in written else None

    def __enter__(self) -> "Claim":
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not os.path.isdir(directory) or os.path.islink(directory):
            raise Claimed(f"{directory} is not a private directory of this user: claims cannot be kept there")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Claimed(f"another vswapctl offload runs on {self.cgroup} (it holds {self.path})") from None
            raise
        try:
            same = os.path.samestat(os.fstat(self.fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:  # its last holder unlinked it between our open and our lock: take the new one
            os.close(self.fd)
            return self.__enter__()
        try:
            left = json.loads(os.pread(self.fd, 1 << 16, 0) or b"null")
        except ValueError:
            left = None
        self.left = left if isinstance(left, dict) and left.get("cgroup") == self.cgroup else None
        return self

    def note(self, found: str, ours: int | None, pending: int | None = None) -> None:
        """The limit found, the one last written (None: the found one is in place) and one
        being written now, if any: a controller killed mid-write left one or the other."""
        data = json.dumps({"cgroup": self.cgroup, "pid": os.getpid(), "found": found, "ours": ours,
                           "pending": pending}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    keep = False  # set when the limit found could not be put back: the next controller may

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
