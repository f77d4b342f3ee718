"""What ``vswapctl up`` set up, saved after every step so that ``down`` can undo
even a half-finished ``up`` or a run whose daemons died; the lock that keeps
two ``vswapctl`` runs off one state directory at once, and the one that keeps
two ``up``s off one mount point."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from . import system
from .procs import ProcessId

DEFAULT_STATE_DIR = "/run/vswapfs"
# One lock file per mount point, whatever the state directory: root's, never on a disk.
MOUNT_LOCK_DIR = "/run/vswapfs/locks"
BACKING_ROOT = "/var/lib/vswapfs"  # on disk: /run is tmpfs, and a backing file must never be


def default_backing(state_dir: str) -> str:
    """One backing file per state directory, under /var/lib/vswapfs: two devices
    never share one by default."""
    real = os.path.realpath(state_dir).strip("/") or "root"
    escaped = real.replace("_", "__").replace("/", "_")
    return os.path.join(BACKING_ROOT, escaped, "backing")


class Busy(Exception):
    """Another vswapctl holds the state directory or the mount point (or a directory is not safe to use)."""


def check_private(directory: str, what: str = "state directory") -> None:
    """The state directory names what gets signalled and unmounted, a lock directory who may
    mount where: only its owner may write it."""
    st = os.lstat(directory)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise Busy(f"{what} {directory} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Busy(f"{what} {directory} is writable by others or not ours (mode {st.st_mode & 0o777:o}, "
                   f"owner {st.st_uid}): use a private one")


class _FileLock:
    """An exclusive, non-blocking flock on DIRECTORY/NAME, held from ``__enter__`` to ``__exit__``.
    DIRECTORY is made private (0700) if missing, and refused if anyone else may write it.  The
    descriptor is close-on-exec: a daemon started meanwhile never holds the lock on."""

    def __init__(self, directory: str, name: str, what: str, busy: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.what = what  # what the directory is, for its errors
        self.busy = busy  # the refusal when someone else holds the lock
        self.fd = -1

    def __enter__(self) -> "_FileLock":
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            check_private(self.directory, self.what)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:  # not ours to make or open (not root?), or a symlink in its place
            raise Busy(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(self.busy) from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateLock(_FileLock):
    """An exclusive lock on STATE_DIR/lock for the length of one ``up`` or ``down``."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir, "lock", "state directory",
                         f"another vswapctl is working on {state_dir} (it holds {state_dir}/lock)")
        self.state_dir = state_dir


def mount_lock_name(mountpoint: str) -> str:
    """The lock file's name for a mount point: a hash of its resolved path (one name per
    place, and any path fits in a file name)."""
    return hashlib.sha256(os.fsencode(system.resolve_mountpoint(mountpoint))).hexdigest()


class MountLock(_FileLock):
    """An exclusive lock on a mount point for the length of one ``up``, whatever its state
    directory.  ``up`` checks that nothing is mounted there, then mounts: two of them at once
    on one mount point would both pass the check, stack two mounts (libfuse allows it) and
    attach both swap areas to the top one, each reading the other's pages.  Lock files stay
    (empty, in /run): removing one while another ``up`` is opening it would let two hold
    "the" lock at once."""

    def __init__(self, mountpoint: str, lock_dir: str | None = None) -> None:
        self.mountpoint = system.resolve_mountpoint(mountpoint)
        lock_dir = lock_dir or MOUNT_LOCK_DIR
        name = mount_lock_name(self.mountpoint)
        super().__init__(lock_dir, name, "lock directory",
                         f"another vswapctl is bringing a device up at {self.mountpoint} "
                         f"(it holds {os.path.join(lock_dir, name)})")


def save_json(path: str, data: dict[str, Any]) -> None:
    """State as JSON, mode 0600, replaced whole (a reader never sees half of it)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def remove_files(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@dataclass
class State:
    state_dir: str
    mountpoint: str = ""
    backing: str = ""
    host: str = ""
    token_file: str = ""  # the store's token, when --host needs one
    insecure_tcp: bool = False  # --host is TCP without a token, as `up --insecure-tcp` accepted
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
        save_json(self.path, asdict(self))

    def remove(self) -> None:
        remove_files(self.path, self.socket, self.control)

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
