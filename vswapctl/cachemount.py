"""An FS-cache mount's life: ``vswapctl cache up`` and ``cache down``.

The cache keeps its state in STATE_DIR/cache (beside a device's, if one is up in
the same state directory): ``cache.json``, fscache's control socket, the socket of
the store ``cache up`` starts when given no ``--host``, and the daemons' logs.  As
for devices, each step is recorded as it completes, a failed ``up`` undoes exactly
what it did, daemons are known by pid and start time, and nothing but the process
``up`` started is ever signalled.  A cache holds no page that is not also in LOWER,
so taking it down loses nothing: ``down`` unmounts (refused while anything uses the
mount), sees fscache exit, and stops the store it started, which drops the pool at
once.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from pagewire.address import INPROC
from vswapcommon.sizes import format_size
from vswapfs.options import inside

from . import system
from .device import DRAIN_WAIT, UMOUNT_TIMEOUT, Say, Stopped, Undo, UpFailed, identify, spawn_daemon, store_pid, \
    wait_ready
from .procs import ProcessId
from .state import MountLock, StateLock, check_private, remove_files, save_json

FSTYPE = "fuse.fscache"


@dataclass
class CacheConfig:
    lower: str
    mountpoint: str
    host: str | None = None  # None: start a hoststore of its own
    capacity: int = 256 << 20
    size: int = 1 << 30
    token_file: str = ""
    insecure_tcp: bool = False
    pressure_source: str | None = None
    policy: str | None = None
    store_args: list[str] = field(default_factory=list)  # the store's --compress and recompression options
    verbose: bool = False
    start_timeout: float = 20.0


@dataclass
class CacheState:
    directory: str  # STATE_DIR/cache
    lower: str = ""
    mountpoint: str = ""
    host: str = ""
    hoststore: dict[str, Any] | None = None  # ProcessId of the store up started (None: --host)
    fscache: dict[str, Any] | None = None
    mounted: bool = False
    mount_dev: str = ""
    created_mountpoint: bool = False

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "cache.json")

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, "host.sock")

    @property
    def control(self) -> str:
        return os.path.join(self.directory, "fscache.sock")

    def log(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.log")

    def save(self) -> None:
        save_json(self.path, asdict(self))

    def remove(self) -> None:
        remove_files(self.path, self.socket, self.control)

    @classmethod
    def load(cls, state_dir: str) -> "CacheState | None":
        directory = cache_dir(state_dir)
        try:
            with open(os.path.join(directory, "cache.json")) as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return None
        data["directory"] = directory
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def cache_dir(state_dir: str) -> str:
    return os.path.join(os.path.abspath(state_dir), "cache")


def stats(state: CacheState, timeout: float = 2.0) -> dict[str, Any] | None:
    """fscache's counters from its control socket, or None if it does not answer."""
    from vswapfs.control import ControlUnavailable, query

    try:
        return query(state.control, timeout)
    except ControlUnavailable:
        return None


# -- up ------------------------------------------------------------------------------------


def bring_up(state_dir: str, cfg: CacheConfig, say: Say) -> CacheState:
    if os.geteuid() != 0:
        raise UpFailed("cache up needs root (a FUSE mount every user can read through)")
    directory = cache_dir(state_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    check_private(directory, "cache state directory")
    os.chmod(directory, 0o700)  # the store's socket lives there: a store accepts only a private directory
    with StateLock(directory), MountLock(cfg.mountpoint):
        old = CacheState.load(state_dir)
        if old is not None:
            raise UpFailed(f"a cache is already up (state in {old.path}); run `vswapctl cache down` first")
        problem = _preflight(cfg)
        if problem:
            raise UpFailed(problem)
        state = CacheState(directory, lower=cfg.lower, mountpoint=cfg.mountpoint)
        state.save()
        undo = Undo()
        try:
            if not os.path.isdir(cfg.mountpoint):
                os.mkdir(cfg.mountpoint, 0o755)
                state.created_mountpoint = True
                undo.push(f"remove {cfg.mountpoint}", lambda: _rmdir(cfg.mountpoint))
            if cfg.host:
                state.host = cfg.host
            else:
                _start_hoststore(state, cfg, undo, say)
            _start_fscache(state, cfg, undo, say)
        except BaseException as exc:
            say(f"error: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
            say("undoing what was set up:")
            undo.run(say)
            state.remove()
            if isinstance(exc, (UpFailed, OSError)):
                raise UpFailed(str(exc)) from None
            raise
        state.save()
        return state


def _preflight(cfg: CacheConfig) -> str | None:
    if not os.path.isdir(cfg.lower):
        return f"LOWER {cfg.lower} is not a directory"
    if system.mount_type(cfg.mountpoint) is not None:
        return f"{cfg.mountpoint} is already a mount point"
    if os.path.isdir(cfg.mountpoint) and os.listdir(cfg.mountpoint):
        return f"mountpoint {cfg.mountpoint} is not empty"
    lower, mnt = os.path.realpath(cfg.lower), cfg.mountpoint
    if inside(lower, mnt) or inside(mnt, lower):
        return f"LOWER {lower} and the mount point {mnt} must not contain one another"
    return None


def _start_hoststore(state: CacheState, cfg: CacheConfig, undo: Undo, say: Say) -> None:
    argv = ["--listen", f"unix:{state.socket}", "--capacity", str(cfg.capacity), *cfg.store_args]
    if cfg.pressure_source:
        argv += ["--pressure-source", cfg.pressure_source]
    if cfg.policy:
        argv += ["--policy", cfg.policy]
    if cfg.verbose:
        argv.append("-v")
    undo.push("stop hoststore", lambda: _stop_hoststore(state, say))
    proc = spawn_daemon("hoststore", argv, state.log("hoststore"))
    state.hoststore = identify(proc, "hoststore").to_dict()
    state.host = f"unix:{state.socket}"
    state.save()
    wait_ready(proc, lambda: store_pid(state.socket) == proc.pid, "hoststore", state.log("hoststore"),
               cfg.start_timeout)
    say(f"hoststore pid {proc.pid} on {state.host}, capacity {format_size(cfg.capacity)}")


def _start_fscache(state: CacheState, cfg: CacheConfig, undo: Undo, say: Say) -> None:
    argv = [state.lower, state.mountpoint, "--host", state.host, "--control", state.control,
            "--size", str(cfg.size)]
    if cfg.token_file:
        argv += ["--token-file", cfg.token_file]
    if cfg.insecure_tcp:
        argv.append("--insecure-tcp")
    if state.host == INPROC:
        argv += ["--capacity", str(cfg.capacity), *cfg.store_args]
        if cfg.pressure_source:
            argv += ["--pressure-source", cfg.pressure_source]
    if cfg.verbose:
        argv.append("-v")
    undo.push("stop fscache", lambda: _stop_fscache(state, say, during_up=True))
    proc = spawn_daemon("fscache", argv, state.log("fscache"))
    state.fscache = identify(proc, "fscache").to_dict()
    state.save()

    def ready() -> bool:
        figures = stats(state, timeout=1.0)
        return figures is not None and figures.get("pid") == proc.pid and \
            system.mount_type(state.mountpoint) == FSTYPE

    wait_ready(proc, ready, "fscache", state.log("fscache"), cfg.start_timeout)
    state.mounted = True
    state.mount_dev = system.mount_device(state.mountpoint) or ""
    state.save()
    say(f"fscache pid {proc.pid}: {state.lower} at {state.mountpoint}, its clean pages in the store at "
        f"{state.host}")


# -- down ----------------------------------------------------------------------------------


def take_down(state_dir: str, say: Say) -> bool:
    """Take the cache down; False if none is up.  Stopped if the mount is in use."""
    directory = cache_dir(state_dir)
    if not os.path.isdir(directory):
        return False
    with StateLock(directory):
        state = CacheState.load(state_dir)
        if state is None:
            return False
        _stop_fscache(state, say)
        _stop_hoststore(state, say)
        if state.created_mountpoint:
            _rmdir(state.mountpoint)
        state.remove()
        return True


def _ours_mounted(state: CacheState) -> bool:
    return bool(state.mounted and state.mount_dev and system.mount_device(state.mountpoint) == state.mount_dev
                and system.mount_type(state.mountpoint) == FSTYPE)


def _stop_fscache(state: CacheState, say: Say, during_up: bool = False) -> None:
    """Unmount, then see fscache exit.  A cache mount at our mount point that up never saw
    ready is ours too when ``during_up`` (up's preflight found nothing mounted there, and
    up holds the mount point's lock), or when our fscache, alive, says it serves it;
    otherwise it is left alone, and this says so."""
    ident = ProcessId.from_dict(state.fscache)
    alive = ident is not None and ident.alive()
    unseen = not state.mounted and system.mount_type(state.mountpoint) == FSTYPE
    if unseen and not during_up and not (alive and (stats(state) or {}).get("pid") == ident.pid):  # type: ignore[union-attr]
        raise Stopped(f"a cache is mounted at {state.mountpoint}, and nothing shows it is ours: not unmounting "
                      f"it (if it is, `umount -l {state.mountpoint}`, then run cache down again)")
    if _ours_mounted(state) or unseen:
        argv = ["umount", state.mountpoint] if alive else ["umount", "-l", state.mountpoint]  # -l: nobody serves it
        try:
            system.run(argv, timeout=UMOUNT_TIMEOUT)
        except system.CommandFailed as exc:
            raise Stopped(f"umount {state.mountpoint} failed (is anything using it? `fuser -vm "
                          f"{state.mountpoint}` says who): {exc}") from None
        say(f"unmounted {state.mountpoint}")
    state.mounted = False
    state.save()
    if ident is None or not alive:
        return
    if ident.wait_gone(15):
        say(f"fscache {ident} exited")
        return
    ident.signal(signal.SIGTERM)
    if not ident.wait_gone(10):
        raise Stopped(f"fscache {ident} did not exit after its unmount (see {state.log('fscache')})")


def _stop_hoststore(state: CacheState, say: Say) -> None:
    """SIGTERM: the store drops what it holds of the cache (ephemeral: nothing to hand back)."""
    ident = ProcessId.from_dict(state.hoststore)
    if ident is None:
        return
    if not ident.alive():
        say(f"hoststore {ident}: not running")
        return
    if ident.stopped():
        ident.signal(signal.SIGCONT)
    ident.signal(signal.SIGTERM)
    if not ident.wait_gone(DRAIN_WAIT):
        ident.signal(signal.SIGTERM)
        if not ident.wait_gone(10):
            ident.signal(signal.SIGKILL)  # it holds nothing that is not in LOWER
            ident.wait_gone(5)
    say(f"hoststore {ident}: stopped")


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass

