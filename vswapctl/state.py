"""What ``vswapctl up`` set up, saved after every step so that ``down`` can undo
even a half-finished ``up`` or a run whose daemons died; and the lock that keeps
two ``vswapctl`` runs off one state directory at once."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .procs import ProcessId

DEFAULT_STATE_DIR = "/run/vswapfs"
BACKING_ROOT = "/var/lib/vswapfs"  # on disk: /run is tmpfs, and a backing file must never be


def default_backing(state_dir: str) -> str:
    """One backing file per state directory, under /var/lib/vswapfs: two devices
    never share one by default."""
    real = os.path.realpath(state_dir).strip("/") or "root"
    escaped = real.replace("_", "__").replace("/", "_")
    return os.path.join(BACKING_ROOT, escaped, "backing")


class Busy(Exception):
    """Another vswapctl holds the state directory (or it is not safe to use)."""


def check_private(state_dir: str) -> None:
    """The state directory names what gets signalled and unmounted: only its owner may write it."""
    st = os.lstat(state_dir)
    if not os.path.isdir(state_dir) or os.path.islink(state_dir):
        raise Busy(f"state directory {state_dir} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Busy(f"state directory {state_dir} is writable by others or not ours (mode {st.st_mode & 0o777:o}, "
                   f"owner {st.st_uid}): use a private one")


class StateLock:
    """An exclusive lock on STATE_DIR/lock for the length of one ``up`` or ``down``."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.fd = -1

    def __enter__(self) -> "StateLock":
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        check_private(self.state_dir)
        self.fd = os.open(os.path.join(self.state_dir, "lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another vswapctl is working on {self.state_dir} (it holds {self.state_dir}/lock)") from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class State:
    state_dir: str
    mountpoint: str = ""
    backing: str = ""
    host: str = ""
    token_file: str = ""  # the store's token, when --host needs one
    size: int = 0
    loop: str = ""
    hoststore: dict[str, int] | None = None  # ProcessId of the store up started (None: --host)
    vswapfs: dict[str, int] | None = None
    created_mountpoint: bool = False
    created_backing: bool = False  # this up created the backing file (and may remove it)
    created_dirs: list[str] = field(default_factory=list)  # made for the backing file, outermost first
    mounted: bool = False  # this up's vswapfs is mounted at mountpoint
    mount_dev: str = ""  # major:minor of that mount, from mountinfo
    swapon_options: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    @property
    def socket(self) -> str:
        return os.path.join(self.state_dir, "host.sock")

    @property
    def control(self) -> str:
        return os.path.join(self.state_dir, "vswapfs.sock")

    @property
    def swapfile(self) -> str:
        return os.path.join(self.mountpoint, "swap")

    def log(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.log")

    @property
    def hoststore_id(self) -> ProcessId | None:
        return ProcessId.from_dict(self.hoststore)

    @property
    def vswapfs_id(self) -> ProcessId | None:
        return ProcessId.from_dict(self.vswapfs)

    def save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for path in (self.path, self.socket, self.control):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @classmethod
    def load(cls, state_dir: str) -> "State | None":
        try:
            with open(os.path.join(state_dir, "state.json")) as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return None
        data["state_dir"] = state_dir
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
