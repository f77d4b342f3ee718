"""A vswapfs swap device's life: bringing it up step by step, and taking it down.

One rule governs every path that stops, unmounts or detaches anything (``down``,
the undo of a failed ``up``, the benchmark, the test fixtures): **nothing that
serves a page listed in /proc/swaps is ever stopped, unmounted or detached.**
:func:`guard` checks it before each such step; if ``swapoff`` fails (ENOMEM
when RAM cannot take the pages back), everything is left running and
:class:`StillSwappedOn` says why and what to do.

``up`` checks everything it can before it changes anything, records each step
in the state directory as it completes it, and if a later step fails undoes
exactly the steps it completed, in reverse order.  It holds the state
directory's lock and its mount point's (``vswapctl.state``) from the first check
to the last step, and attaches a loop device only to a mount it has seen its own
vswapfs serve.  Daemons are started isolated, in ``/`` (``vswapctl.launch``),
and known by pid and start time (``vswapctl.procs``): nothing but the process
``up`` started is ever signalled.  util-linux's ``losetup``, ``mkswap``,
``swapon`` and ``swapoff`` are run through PATH, so that users' wrappers (and
tests) can stand in for them.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagewire.address import INPROC
from pagewire.messages import PAGE_SIZE
from vswapcommon.sizes import format_size
from vswapfs.backingcheck import is_block_device

from . import launch, system
from .procs import ProcessId
from .state import MountLock, State, StateLock

READY_TIMEOUT = 20.0
OWN_MOUNT_TIMEOUT = 5.0  # for our own vswapfs, just seen answering, to answer a read through its mount
UMOUNT_TIMEOUT = 60.0
# A store told to stop drains first.  When down stops it, our vswapfs is already gone (it
# released its pages at unmount, or died with them): nobody will come for what the store
# still holds, so after this wait it is told again, and exits at once.
DRAIN_WAIT = 5.0

Say = Callable[[str], None]


class UpFailed(Exception):
    """``up`` could not finish; what it did has been undone (the message says what failed)."""


class Stopped(Exception):
    """Taking the device down stopped here, by the rule: nothing more was touched."""


class StillSwappedOn(Stopped):
    """A device of ours is still in /proc/swaps."""


@dataclass
class UpConfig:
    size: int | None
    backing: str
    mountpoint: str
    capacity: int
    host: str | None = None
    token_file: str | None = None  # the token of the store at --host
    insecure_tcp: bool = False  # --host tcp:... on loopback without a token, accepted (vswapfs --insecure-tcp)
    writethrough: bool = False
    pressure_source: str | None = None
    priority: int | None = None
    discard: bool = True
    swap: bool = True  # False: mount only (the file, for experiments with fio and the like)
    verbose: bool = False
    start_timeout: float = READY_TIMEOUT  # for each daemon to say it is ready
    extra_hoststore: list[str] = field(default_factory=list)
    compress: str = "off"  # the started store keeps pages compressed (hoststore/vswapfs --compress)
    recompress: list[str] = field(default_factory=list)  # and its --recompress-* options


# -- the rule ---------------------------------------------------------------------------


def our_loops(state: State) -> list[str]:
    """Loop devices attached to our swap file: matched against the path ``up`` resolved
    before mounting (from /sys; nothing here stats the mount or probes a device)."""
    return system.loops_for(state.swapfile) if state.mountpoint else []


def guard(state: State, what: str) -> None:
    """Refuse ``what`` while any loop device on our swap file is swapped on."""
    active = system.swapped_on_devices()
    live = [loop for loop in our_loops(state) if system.swapped_on(loop, active)]
    if live:
        raise StillSwappedOn(f"{', '.join(live)} is still swapped on: not going to {what}")


def _make_private(state_dir: str, say: Say) -> None:
    """The store's socket lives in the state directory, and the store accepts only a
    directory nobody else can enter (ours already: check_private)."""
    mode = stat.S_IMODE(os.stat(state_dir).st_mode)
    if mode & 0o077:
        os.chmod(state_dir, mode & 0o700)
        say(f"made {state_dir} private (mode {mode:04o} -> {mode & 0o700:04o}): the store's socket lives there")


def stopped_advice(state: State, reason: str) -> str:
    return (
        f"{reason}.\nNothing more was stopped, unmounted or detached: the device keeps serving its pages, and "
        f"every process with pages there keeps working.\nIf swapoff failed with ENOMEM, RAM cannot take the "
        f"swapped-out pages back: free memory (end the workload, or swapon another device); if vswapfs does "
        f"not answer, SIGCONT it.  Then run `vswapctl --state-dir {state.state_dir} down` again."
    )


# -- up -----------------------------------------------------------------------------------


def preflight(state_dir: str, cfg: UpConfig) -> list[str]:
    """Everything that would make ``up`` fail, found before anything is changed (as root,
    holding the mount point's lock: nothing else of ours can change what is found)."""
    problems = []
    mnt = cfg.mountpoint
    if os.path.islink(mnt):
        problems.append(f"mountpoint {mnt} is a symlink: give the real path")
    elif os.path.lexists(mnt):
        if system.mount_type(mnt) is not None or os.path.ismount(mnt):
            problems.append(f"mountpoint {mnt} is already mounted")
        elif not os.path.isdir(mnt):
            problems.append(f"mountpoint {mnt} is not a directory")
        elif os.listdir(mnt):
            problems.append(f"mountpoint {mnt} is not empty")
    if is_block_device(cfg.backing):
        problems += _device_problems(cfg)
    else:
        problems += _file_problems(cfg)
    return problems


def _file_problems(cfg: UpConfig) -> list[str]:
    from vswapfs.backingcheck import BackingError, check_directory, check_location, check_owner

    problems = []
    # Where the backing file's directory will be made, if it does not exist yet.
    stand_in = os.path.join(_nearest_existing(os.path.dirname(cfg.backing)), "backing")
    for check in (lambda: check_location(stand_in, cfg.mountpoint), lambda: check_directory(stand_in)):
        try:
            check()
        except BackingError as exc:
            problems.append(str(exc).replace(stand_in, cfg.backing))
    if os.path.islink(cfg.backing):
        problems.append(f"backing file {cfg.backing} is a symlink: give the real path")
    elif os.path.exists(cfg.backing):
        try:
            check_owner(os.lstat(cfg.backing), cfg.backing)
        except BackingError as exc:
            problems.append(str(exc))
        if _locked(cfg.backing):
            problems.append(f"backing file {cfg.backing} is in use by another vswapfs")
        elif cfg.size is not None and os.path.getsize(cfg.backing) != cfg.size:
            problems.append(f"backing file {cfg.backing} has {os.path.getsize(cfg.backing)} bytes, "
                            f"not the {cfg.size} asked for (remove it, or leave --size out)")
    elif cfg.size is None:
        problems.append(f"--size is needed to create the backing file {cfg.backing}")
    return problems


def _device_problems(cfg: UpConfig) -> list[str]:
    """A backing device: vswapfs opens it exclusively and checks what is on it; here, what can
    be told without opening it."""
    from vswapfs.backingcheck import SIGNATURE_BYTES, BackingError, check_device, check_signature

    try:
        check_device(cfg.backing, os.stat(cfg.backing))
        with open(cfg.backing, "rb") as f:
            check_signature(cfg.backing, f.read(SIGNATURE_BYTES))
    except BackingError as exc:
        return [str(exc)]
    size = device_size(cfg.backing)
    if cfg.size is not None and cfg.size > size:
        return [f"backing device {cfg.backing} has {size} bytes, less than the {cfg.size} asked for"]
    return []


def device_size(path: str) -> int:
    """Bytes in a block device, whole pages only."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return size - size % PAGE_SIZE


def _nearest_existing(directory: str) -> str:
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Undo:
    """What ``up`` has done, to be undone in reverse if a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.steps.append((what, action))

    def run(self, say: Say) -> None:
        """Undo in reverse order.  At the first step that fails, stop (Stopped): what
        comes before it in the list may depend on it (a store serving a mounted vswapfs,
        a backing file a live vswapfs holds)."""
        while self.steps:
            what, action = self.steps[-1]
            try:
                action()
            except Stopped:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was, nothing below it is touched
                raise Stopped(f"could not {what}: {exc}") from None
            self.steps.pop()
            say(f"undone: {what}")


def _mount_lock(mountpoint: str) -> MountLock:
    """The mount point's lock (``up`` holds it from preflight to the last step); only root
    can take it, and only root can bring a device up."""
    if os.geteuid() != 0:
        raise UpFailed("up needs root (FUSE mount, loop device, swapon)")
    return MountLock(mountpoint)


def bring_up(state_dir: str, cfg: UpConfig, say: Say) -> State:
    state_dir = os.path.abspath(state_dir)  # the daemons run in /: every path they get is absolute
    with StateLock(state_dir), _mount_lock(cfg.mountpoint):
        old = State.load(state_dir)
        if old is not None:
            raise UpFailed(f"a device is already up (state in {old.path}); run `vswapctl down` first")
        problems = preflight(state_dir, cfg)
        if problems:
            raise UpFailed("; ".join(problems))
        if not cfg.host or cfg.host == INPROC:
            _make_private(state_dir, say)
        state = State(state_dir, mountpoint=cfg.mountpoint, backing=cfg.backing)
        state.save()
        undo = Undo()
        try:
            _make_places(state, cfg, undo, say)
            if cfg.host == INPROC:
                state.host = INPROC
                say(f"no store daemon: vswapfs keeps up to {format_size(cfg.capacity)} of pages in its own memory")
            elif cfg.host:
                state.host = cfg.host
                state.token_file = os.path.abspath(cfg.token_file) if cfg.token_file else ""
                state.insecure_tcp = cfg.insecure_tcp
            else:
                _start_hoststore(state, cfg, undo, say)
            _start_vswapfs(state, cfg, undo, say)
            if cfg.swap:
                _attach_swap(state, cfg, undo, say)
        except BaseException as exc:
            say(f"error: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
            say("undoing what was set up:")
            try:
                undo.run(say)
            except Stopped as stuck:
                state.save()  # down can finish the job
                raise UpFailed(f"{exc}; then undoing stopped: " + stopped_advice(state, str(stuck))) from None
            state.remove()
            if isinstance(exc, (UpFailed, system.CommandFailed, OSError)):
                raise UpFailed(str(exc)) from None
            raise
        state.save()
        return state


def _make_places(state: State, cfg: UpConfig, undo: Undo, say: Say) -> None:
    if not os.path.isdir(state.mountpoint):
        undo.push(f"remove {state.mountpoint}", lambda: _rmdir_if_empty(state.mountpoint))
        os.mkdir(state.mountpoint, mode=0o700)
        state.created_mountpoint = True
        state.save()
    missing = []
    directory = os.path.dirname(state.backing)
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(missing):  # outermost first
        undo.push(f"remove {directory}", lambda d=directory: _rmdir_if_empty(d))  # type: ignore[misc]
        os.mkdir(directory, mode=0o700)
        state.created_dirs.append(directory)
        state.save()
    if cfg.size is not None and not os.path.exists(state.backing):
        # Made here, exclusively: if another up races for the same path, only one of us
        # made it, and only that one may ever remove it.  Written in full here, with progress
        # on the terminal (vswapfs would do it too, but within --start-timeout).
        try:
            fd = os.open(state.backing, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UpFailed(f"backing file {state.backing} appeared while up was starting: another up?") from None
        undo.push(f"remove {state.backing}", lambda: _unlink_missing_ok(state.backing))
        state.created_backing = True
        state.save()
        try:
            os.ftruncate(fd, cfg.size)
            _fill(fd, state.backing, cfg.size, say)
        finally:
            os.close(fd)


def _fill(fd: int, path: str, size: int, say: Say) -> None:
    """Write zeros over the new backing file, once (vswapfs.backing says why)."""
    from vswapfs.backing import fill, set_direct
    from vswapfs.backingcheck import BackingError

    start = time.monotonic()
    say(f"writing {format_size(size)} of zeros to {path}, once: from then on no swap-out waits for the "
        f"filesystem to allocate a block")
    try:
        fill(fd, size, path, set_direct(fd, path))
    except BackingError as exc:  # a full disk, say: up undoes what it did and says why
        raise UpFailed(str(exc)) from None
    say(f"{path} written in {time.monotonic() - start:.1f}s")


def spawn_daemon(module: str, args: list[str], log_path: str) -> subprocess.Popen[bytes]:
    """``python -m module args`` as a daemon: isolated and in / (no code from the caller's
    directory: ``vswapctl.launch``), in a session of its own, and out of the caller's memory
    cgroup (a memory limit on whoever ran up must never push a swap daemon into swap or OOM)."""
    from .cgroup import leave_memory_limit

    with open(log_path, "ab") as log:
        return launch.popen(module, *args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, preexec_fn=leave_memory_limit)


def log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:])
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, log_path: str,
                timeout: float) -> None:
    """Until *this* child says it is ready; at once if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise UpFailed(f"{what} exited with status {proc.returncode} during start-up: {log_tail(log_path)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise UpFailed(f"{what} not ready after {timeout:g}s (see --start-timeout): {log_tail(log_path)}")
        time.sleep(0.05)


def identify(proc: subprocess.Popen[bytes], what: str) -> ProcessId:
    ident = ProcessId.of(proc.pid)
    if ident is None:
        raise UpFailed(f"{what} (pid {proc.pid}) exited at once")
    return ident


def store_pid(socket_path: str) -> int | None:
    """The pid the store at ``socket_path`` reports, or None if it does not answer."""
    import trio

    from pagewire.address import Address
    from pagewire.messages import Stats
    from vswapfs.hostclient import query
    from vswapfs.pagestore import StoreError, StoreUnavailable

    if not os.path.exists(socket_path):
        return None
    try:
        stats = trio.run(query, Address("unix", path=socket_path), Stats(), 1.0)
    except (StoreUnavailable, StoreError, OSError):
        return None
    pid = stats.get("pid")
    return pid if isinstance(pid, int) else None


def _start_hoststore(state: State, cfg: UpConfig, undo: Undo, say: Say) -> None:
    argv = ["--listen", f"unix:{state.socket}", "--capacity", str(cfg.capacity), "--compress", cfg.compress,
            *cfg.recompress]
    if cfg.pressure_source:
        argv += ["--pressure-source", cfg.pressure_source]
    argv += cfg.extra_hoststore
    if cfg.verbose:
        argv.append("-v")
    undo.push("stop hoststore", lambda: _stop_hoststore(state, say))
    proc = spawn_daemon("hoststore", argv, state.log("hoststore"))
    ident = identify(proc, "hoststore")
    state.hoststore = ident.to_dict()
    state.host = f"unix:{state.socket}"
    state.save()
    wait_ready(proc, lambda: store_pid(state.socket) == proc.pid, "hoststore", state.log("hoststore"),
                cfg.start_timeout)
    say(f"hoststore pid {proc.pid} on {state.host}, capacity {format_size(cfg.capacity)}")


def _vswapfs_stats(state: State, timeout: float = 1.0) -> dict[str, object] | None:
    from vswapfs.control import ControlUnavailable, query

    try:
        return query(state.control, timeout)
    except ControlUnavailable:
        return None


def _start_vswapfs(state: State, cfg: UpConfig, undo: Undo, say: Say) -> None:
    argv = [state.mountpoint, "--backing", state.backing, "--host", state.host, "--control", state.control]
    if cfg.size:
        argv += ["--size", str(cfg.size)]
    if cfg.writethrough:
        argv.append("--writethrough")
    if state.token_file:
        argv += ["--token-file", state.token_file]
    if state.insecure_tcp:
        argv.append("--insecure-tcp")
    if state.host == INPROC:
        argv += ["--capacity", str(cfg.capacity), "--compress", cfg.compress, *cfg.recompress]
        if cfg.pressure_source:
            argv += ["--pressure-source", cfg.pressure_source]
    if cfg.verbose:
        argv.append("-v")
    undo.push("stop vswapfs", lambda: _stop_vswapfs(state, say))
    proc = spawn_daemon("vswapfs", argv, state.log("vswapfs"))
    ident = identify(proc, "vswapfs")
    state.vswapfs = ident.to_dict()
    state.save()

    def ready() -> bool:
        stats = _vswapfs_stats(state)
        return stats is not None and stats.get("pid") == proc.pid and \
            system.mount_type(state.mountpoint) == "fuse.vswapfs"

    wait_ready(proc, ready, "vswapfs", state.log("vswapfs"), cfg.start_timeout)
    state.mount_dev = own_mount(state.mountpoint, proc.pid)
    state.mounted = True
    state.size = int((_vswapfs_stats(state) or {}).get("device_bytes") or os.stat(state.backing).st_size)
    state.save()
    say(f"vswapfs pid {proc.pid} serving {state.swapfile} ({format_size(state.size)}), backing {state.backing}")
    deadline = time.monotonic() + 3
    while not (_vswapfs_stats(state) or {}).get("host_connected"):
        if time.monotonic() > deadline:
            say(f"warning: vswapfs is not connected to the host store at {state.host}; pages go to the "
                f"backing file until it is (see {state.log('vswapfs')})")
            break
        time.sleep(0.05)


def own_mount(mountpoint: str, pid: int, mountinfo: str = system.MOUNTINFO) -> str:
    """``major:minor`` of the mount at ``mountpoint``, once it is certain to be the one the
    vswapfs with ``pid`` serves: the only mount there, and what answers a read of its stats
    file (through the mount, as losetup will open the swap file) is that vswapfs, on that
    device.  Another mount stacked there meanwhile (libfuse allows it) would otherwise get
    our swap area.  UpFailed if not."""
    devices = system.mount_devices(mountpoint, mountinfo)
    if len(devices) != 1:
        raise UpFailed(f"{len(devices)} file systems are mounted at {mountpoint}, not only our vswapfs "
                       "(was something else mounted there meanwhile?): not using any of them")
    stats_file = os.path.join(mountpoint, "stats")
    device, data = _read_through_mount(stats_file, OWN_MOUNT_TIMEOUT)
    try:
        served_by = json.loads(data).get("pid")
    except (ValueError, AttributeError):
        served_by = None
    if device != devices[0] or served_by != pid:
        raise UpFailed(f"the file system at {mountpoint} is not the one our vswapfs (pid {pid}) serves: "
                       f"{stats_file} is on {device} and names pid {served_by}, the mount is {devices[0]}")
    return device


def _read_through_mount(path: str, timeout: float) -> tuple[str, bytes]:
    """(``major:minor`` of the file system holding ``path``, its contents), or UpFailed within
    ``timeout``: a FUSE file system that does not answer must not hang up (the reading thread
    is left to the kernel; a fatal signal or the process's exit ends its wait)."""
    result: list[tuple[str, bytes] | OSError] = []

    def read() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
            finally:
                os.close(fd)
            result.append((f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", b"".join(chunks)))
        except OSError as exc:
            result.append(exc)

    reader = threading.Thread(target=read, name="read-through-mount", daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise UpFailed(f"{path} did not answer in {timeout:.0f}s")
    if isinstance(result[0], OSError):
        raise UpFailed(f"cannot read {path}: {result[0]}")
    return result[0]


def _attach_swap(state: State, cfg: UpConfig, undo: Undo, say: Say) -> None:
    undo.push("detach the loop device", lambda: _detach_loops(state, say))
    loop = system.run(["losetup", "--direct-io=on", "--find", "--show", state.swapfile]).strip()
    if not loop.startswith("/dev/loop") or loop not in system.loops_for(state.swapfile):
        raise UpFailed(f"losetup printed {loop!r}, not a loop device on {state.swapfile}")
    state.loop = loop
    state.save()
    attached_to = system.loop_backing_device(loop)
    if attached_to != state.mount_dev:  # the path is ours; what losetup opened must be too
        raise UpFailed(f"{loop} is attached to a file on {attached_to}, not on our vswapfs mount "
                       f"({state.mount_dev}): was something mounted over it meanwhile?")
    if not system.loop_dio(loop):
        say(f"warning: {loop} does not use direct I/O; swap pages will pass through the page cache")
    system.run(["mkswap", loop])
    options = ["--priority", str(cfg.priority)] if cfg.priority is not None else []
    if cfg.discard:
        if (_vswapfs_stats(state) or {}).get("discard_supported"):
            options.append("--discard=pages")
        else:
            say("warning: this vswapfs cannot take discards (unpatched pyfuse3): swapping on without discard")
    state.swapon_options = options
    state.save()
    undo.push("swapoff", lambda: _swap_off(state, say))
    system.run(["swapon", *options, loop])
    say(f"swap on {loop} ({format_size(state.size)}, direct I/O {'on' if system.loop_dio(loop) else 'off'}, "
        f"discard {'on' if '--discard=pages' in options else 'off'})")


# -- down -----------------------------------------------------------------------------------


def take_down(state_dir: str, say: Say) -> bool:
    """swapoff -> losetup -d -> unmount -> stop the daemons -> remove what up created.
    Stops at the first step the rule forbids; True if everything was taken down."""
    with StateLock(state_dir):
        state = State.load(state_dir)
        if state is None:
            say(f"nothing to take down (no state in {state_dir})")
            return True
        try:
            _swap_off(state, say)
            _detach_loops(state, say)
            _stop_vswapfs(state, say)
            _stop_hoststore(state, say)
        except (Stopped, system.CommandFailed) as exc:
            say(stopped_advice(state, str(exc)))
            return False
        _remove_created(state, say)
        state.remove()
        return True


def _swap_off(state: State, say: Say) -> None:
    active = system.swapped_on_devices()
    for loop in our_loops(state):
        if system.swapped_on(loop, active):
            try:
                system.run(["swapoff", loop], timeout=1800)
            except system.CommandFailed as exc:
                raise StillSwappedOn(f"swapoff {loop} failed: {exc}") from None
            say(f"swapoff {loop}")


def _detach_loops(state: State, say: Say) -> None:
    guard(state, "detach a loop device")
    for loop in our_loops(state):
        system.run(["losetup", "-d", loop])
        say(f"detached {loop}")
    left = system.wait_detached(state.swapfile)
    if left:
        raise Stopped(f"{', '.join(left)} still holds {state.swapfile} after losetup -d")


def _stop_vswapfs(state: State, say: Say) -> None:
    """Unmount our vswapfs mount, then see our vswapfs exit.  vswapfs is never killed:
    if anything still holds its file, or it cannot be asked, this stops (Stopped)."""
    guard(state, "unmount vswapfs")
    if our_loops(state):
        raise Stopped(f"a loop device is still attached to {state.swapfile}: not going to unmount")
    ident = state.vswapfs_id
    alive = ident is not None and ident.alive()
    ours = state.mounted and state.mount_dev and system.mount_device(state.mountpoint) == state.mount_dev
    if ours and system.mount_type(state.mountpoint) == "fuse.vswapfs":
        if alive:
            stats = _vswapfs_stats(state, timeout=2.0)
            if stats is None:
                raise Stopped(f"vswapfs {ident} does not answer on {state.control} (stopped?): cannot tell "
                              "whether its file is in use; not going to unmount")
            if stats.get("swap_opens"):
                raise Stopped(f"{state.swapfile} is still open ({stats['swap_opens']} opener(s)): "
                              "not going to unmount")
            try:
                system.run(["umount", state.mountpoint], timeout=UMOUNT_TIMEOUT)
            except system.CommandFailed as exc:
                raise Stopped(f"umount {state.mountpoint} failed: {exc}") from None
            say(f"unmounted {state.mountpoint}")
        else:  # nobody serves it any more: a lazy unmount takes nothing from anyone
            system.run(["umount", "-l", state.mountpoint], timeout=UMOUNT_TIMEOUT)
            say(f"lazily unmounted {state.mountpoint} (vswapfs {ident} had died)")
    state.mounted = False
    state.save()
    if ident is None:
        return
    if not alive:
        say(f"vswapfs {ident}: not running")
        return
    if ident.wait_gone(15):
        say(f"vswapfs {ident} exited")
        return
    ident.signal(signal.SIGTERM)  # it refuses, and says so, if its file is still open
    if ident.wait_gone(10):
        say(f"vswapfs {ident} stopped")
        return
    raise Stopped(f"vswapfs {ident} did not exit after its unmount (see {state.log('vswapfs')})")


def _stop_hoststore(state: State, say: Say) -> None:
    """SIGTERM: the store drains (hands back what it holds) and exits.  Told a second
    time if it is still waiting after DRAIN_WAIT, for clients that will not come back."""
    ident = state.hoststore_id
    if ident is None:
        return
    guard(state, "stop the host store")
    if not ident.alive():
        say(f"hoststore {ident}: not running")
        return
    if ident.stopped():
        ident.signal(signal.SIGCONT)
    ident.signal(signal.SIGTERM)
    if ident.wait_gone(DRAIN_WAIT):
        say(f"hoststore {ident}: stopped")
        return
    ident.signal(signal.SIGTERM)  # the second one: exit at once (it logs what it drops)
    if ident.wait_gone(10):
        say(f"hoststore {ident}: stopped after a second SIGTERM (see {state.log('hoststore')})")
        return
    ident.signal(signal.SIGKILL)  # our vswapfs is gone: the store serves no page of ours now
    if not ident.wait_gone(5):
        raise Stopped(f"hoststore {ident} does not go away, even on SIGKILL")
    say(f"hoststore {ident}: killed (it did not stop on SIGTERM)")


def _remove_created(state: State, say: Say) -> None:
    if state.created_backing:
        _unlink_missing_ok(state.backing)
        say(f"removed {state.backing} (this up created it)")
    for directory in reversed(state.created_dirs):
        _rmdir_if_empty(directory)
    if state.created_mountpoint:
        _rmdir_if_empty(state.mountpoint)


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
