"""The swap devices ``vswapctl bench`` measures, each a context manager that sets one
up, yields it swapped on, and takes it down again in ``finally``:

  zram             a zram device (compresses each page in RAM), its default algorithm
  zram-lzo ...     the same with that algorithm (zram-lzo, zram-lz4, zram-zstd: skipped
                   where this kernel's zram does not offer it)
  floor            the least a pyfuse3 server can do (``vswapctl.floorfs``: pages in its
                   own memory, no store, no checksum) on a loop device with direct I/O:
                   what vswapfs's paths are measured against
  loop             a file on disk (the bench's directory under /var/tmp, never tmpfs)
                   on a loop device with direct I/O
  inproc           vswapfs with its in-process store (``up --host inproc``), capacity
                   the device size
  hoststore        vswapfs with its own hoststore, capacity the device size: every page admitted
  hoststore-zstd   the same, the store keeping pages compressed (``--compress zstd``)
  hoststore-lz4    the same with ``--compress lz4``
  hoststore-small  the same with a store capacity below the workload: the rest goes to
                   the backing file
  redis-cluster    vswapfs with its own hoststore keeping its pages on a local Redis
                   Cluster (3 masters, 3 replicas; ``hoststore --tier``), started for
                   each run with tools/redis-cluster.sh and stopped after the device

Taking down always runs swapoff -> losetup -d -> remove files (``device.take_down``
for vswapfs).  If swapoff fails (ENOMEM: RAM cannot take the pages back) nothing
under the device is touched: :class:`BenchError` says what was left and how to
finish.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from pagewire.address import INPROC

from . import device, system
from .state import Busy, State

ZRAM_TARGETS = {"zram": None, "zram-lzo": "lzo", "zram-lz4": "lz4", "zram-zstd": "zstd"}  # target: algorithm
COMPRESSED_TARGETS = {"hoststore-zstd": "zstd", "hoststore-lz4": "lz4"}  # target: hoststore --compress
TARGETS = (*ZRAM_TARGETS, "floor", "loop", "inproc", "hoststore", *COMPRESSED_TARGETS, "hoststore-small", "redis-cluster")
# What a bench without --targets runs: the compressing ones are asked for by name.
DEFAULT_TARGETS = ("zram", "loop", "inproc", "hoststore", "hoststore-small", "redis-cluster")
VSWAPFS_TARGETS = ("inproc", "hoststore", *COMPRESSED_TARGETS, "hoststore-small", "redis-cluster")
FLOOR_START_TIMEOUT = 10.0
SAMPLE_INTERVAL = 0.02  # zram's memory, sampled while the workload runs
ZRAM_CONTROL = "/sys/class/zram-control"
PRIORITY = 32767  # above any swap the machine already has: the workload's pages go here
SWAPOFF_TIMEOUT = 1800

Say = Callable[[str], None]


class BenchError(Exception):
    pass


@dataclass
class Target:
    """A target swapped on: its device, and what it can tell after the workload
    (read before it is taken down)."""

    device: str
    report: Callable[[], dict[str, Any]] = field(default=dict)
    daemons: Callable[[], dict[str, int]] = field(default=dict)  # name: pid, the processes serving it


def zram_missing(target: str = "zram") -> str | None:
    """Why there is no such zram target here, or None."""
    if not os.path.exists(os.path.join(ZRAM_CONTROL, "hot_add")):
        return f"no {ZRAM_CONTROL} (modprobe zram to bench against it)"
    algorithm = ZRAM_TARGETS[target]
    if algorithm is not None:
        offered = zram_algorithms()
        if algorithm not in offered:
            return f"this kernel's zram offers {', '.join(offered) or 'no algorithm'}, not {algorithm}"
    return None


def check_workdir(workdir: str) -> None:
    """Files of the loop and vswapfs targets live here: on a disk filesystem, never tmpfs
    (a tmpfs page can be swapped to the device it backs, and swapoff then hangs for good)."""
    from vswapfs.backing import BackingError, check_location

    try:
        check_location(os.path.join(workdir, "probe"), None)
    except BackingError as exc:
        raise BenchError(f"{workdir}: {exc}") from None


def _still_swapped_on(dev: str) -> bool:
    return dev in system.swaps() or system.swapped_on(dev)


def _left_in_place(dev: str, finish: str, cause: BaseException | None) -> BenchError | None:
    if not _still_swapped_on(dev):
        return None
    why = f" ({cause})" if isinstance(cause, (system.CommandFailed, BenchError)) else ""
    return BenchError(f"{dev} is still swapped on{why}: leaving it and everything under it in place; free "
                      f"memory, then finish by hand: {finish}")


@contextmanager
def _undo_unless_swapped_on(dev: str, finish: str, undo: Callable[[], None]) -> Iterator[None]:
    """When the block ends, however it ends, ``undo`` (what lies under ``dev``), unless
    ``dev`` is still swapped on: then nothing is touched, and BenchError says how to
    finish by hand."""
    try:
        yield
    except BaseException as exc:
        stuck = _left_in_place(dev, finish, exc)
        if stuck:
            raise stuck from None
        undo()
        raise
    stuck = _left_in_place(dev, finish, None)
    if stuck:
        raise stuck
    undo()


@contextmanager
def swap_on(dev: str) -> Iterator[str]:
    """mkswap and swapon ``dev`` (an explicit device, never empty); swapoff when the block
    ends.  A swapoff that fails raises system.CommandFailed: the device stays on."""
    if not dev:
        raise BenchError("no device to swap on")
    system.run(["mkswap", dev])
    system.run(["swapon", "--priority", str(PRIORITY), dev])
    try:
        yield dev
    finally:
        system.run(["swapoff", dev], timeout=SWAPOFF_TIMEOUT)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def zram_algorithms() -> list[str]:
    """The algorithms this kernel's zram offers (a device added and removed to ask)."""
    index = _read(os.path.join(ZRAM_CONTROL, "hot_add"))
    if not index.isdigit():
        return []
    try:
        return [a.strip("[]") for a in _read(f"/sys/block/zram{index}/comp_algorithm").split()]
    finally:
        _write(os.path.join(ZRAM_CONTROL, "hot_remove"), index)


class ZramMemory:
    """zram's mm_stat, sampled while the workload runs: the data it held at its fullest
    and the memory that took (``orig_data_size`` and ``mem_used_total`` then)."""

    def __init__(self, name: str) -> None:
        self.path = f"/sys/block/{name}/mm_stat"
        self.data_bytes = self.mem_bytes = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampling thread, and the report's last look
        self._thread = threading.Thread(target=self._run, name="zram-mm-stat", daemon=True)

    def sample(self) -> None:
        fields = _read(self.path).split()
        if len(fields) >= 3 and fields[0].isdigit() and fields[2].isdigit():
            data, mem = int(fields[0]), int(fields[2])
            with self._lock:
                if data >= self.data_bytes:
                    self.data_bytes, self.mem_bytes = data, mem

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def __enter__(self) -> "ZramMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _zram_report(name: str, memory: ZramMemory) -> dict[str, Any]:
    """The compressor, the most RAM the device ever used (mm_stat's mem_used_max), and
    its memory at its fullest (sampled: the workload's pages are gone from it by now)."""
    out: dict[str, Any] = {}
    algorithms = _read(f"/sys/block/{name}/comp_algorithm").split()
    chosen = [a.strip("[]") for a in algorithms if a.startswith("[")]
    if chosen:
        out["zram_comp_algorithm"] = chosen[0]
    mm_stat = _read(f"/sys/block/{name}/mm_stat").split()
    if len(mm_stat) >= 5 and mm_stat[4].isdigit():
        out["zram_mem_used_max"] = int(mm_stat[4])
    memory.sample()
    out.update(fullest(memory.data_bytes, memory.mem_bytes))
    return out


def fullest(data_bytes: int, mem_bytes: int) -> dict[str, Any]:
    """What a target reports of its memory: page data at its fullest, and the memory that took."""
    if not data_bytes or not mem_bytes:
        return {}
    return {"data_bytes_fullest": data_bytes, "mem_bytes_fullest": mem_bytes,
            "data_per_mem": round(data_bytes / mem_bytes, 3)}


@contextmanager
def zram_swap(size: int, target: str = "zram") -> Iterator[Target]:
    missing = zram_missing(target)
    if missing:
        raise BenchError(missing)
    index = _read(os.path.join(ZRAM_CONTROL, "hot_add"))
    if not index.isdigit():
        raise BenchError(f"{ZRAM_CONTROL}/hot_add gave {index!r}, not a device number")
    name = f"zram{index}"
    dev = f"/dev/{name}"
    finish = f"swapoff {dev}; echo {index} > {ZRAM_CONTROL}/hot_remove"
    with _undo_unless_swapped_on(dev, finish, lambda: _write(os.path.join(ZRAM_CONTROL, "hot_remove"), index)):
        algorithm = ZRAM_TARGETS[target]
        if algorithm is not None:
            _write(f"/sys/block/{name}/comp_algorithm", algorithm)
        _write(f"/sys/block/{name}/disksize", str(size))
        with swap_on(dev), ZramMemory(name) as memory:
            yield Target(dev, lambda: _zram_report(name, memory))


def _detach(loop: str, path: str, remove: bool = True) -> None:
    system.run(["losetup", "-d", loop])
    left = system.wait_detached(path)
    if left:
        raise BenchError(f"{', '.join(left)} still holds {path} after losetup -d; finish by hand: "
                         f"losetup -d {' '.join(left)}" + (f"; rm {path}" if remove else ""))


@contextmanager
def loop_swap(size: int, workdir: str) -> Iterator[Target]:
    path = os.path.join(workdir, "loop-swapfile")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        loop = system.run(["losetup", "--direct-io=on", "--find", "--show", path]).strip()
        if not loop.startswith("/dev/loop") or loop not in system.loops_for(path):
            raise BenchError(f"losetup printed {loop!r}, not a loop device on {path}; see losetup -j {path}")
        finish = f"swapoff {loop}; losetup -d {loop}; rm {path}"
        with _undo_unless_swapped_on(loop, finish, lambda: _detach(loop, path)):
            if not system.loop_dio(loop):
                raise BenchError(f"{loop} has no direct I/O on {path} (its filesystem refuses O_DIRECT?): the "
                                 "loop target would measure the page cache")
            with swap_on(loop):
                yield Target(loop, lambda: {"direct_io": system.loop_dio(loop)})
    finally:
        if not system.loops_for(path):  # a loop device still on it: it stays, as the error says
            _unlink(path)


@contextmanager
def floor_swap(size: int, workdir: str) -> Iterator[Target]:
    """floorfs mounted in ``workdir``, its file on a loop device with direct I/O, swapped on.
    floorfs runs as the vswapfs daemons do (a session of its own, out of the bench's memory
    cgroup, its memory locked, out of the OOM killer's choice): nothing that reaches the
    bench (^C, a hang-up) reaches it, and it is stopped only once its loop device is gone."""
    mnt = os.path.join(workdir, "floor-mnt")
    os.makedirs(mnt, exist_ok=True)
    log_path = os.path.join(workdir, "floorfs.log")
    proc = device.spawn_daemon("vswapctl.floorfs", [mnt, str(size)], log_path)
    path = os.path.join(mnt, "swap")
    try:
        deadline = time.monotonic() + FLOOR_START_TIMEOUT
        while system.mount_type(mnt) != "fuse.floorfs":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"floorfs did not mount on {mnt}: {device.log_tail(log_path)}")
            time.sleep(0.05)
        loop = system.run(["losetup", "--direct-io=on", "--find", "--show", path]).strip()
        if not loop.startswith("/dev/loop") or loop not in system.loops_for(path):
            raise BenchError(f"losetup printed {loop!r}, not a loop device on {path}; see losetup -j {path}")
        finish = f"swapoff {loop}; losetup -d {loop}; umount {mnt}; kill {proc.pid}"
        with _undo_unless_swapped_on(loop, finish, lambda: _detach(loop, path, remove=False)):
            if not system.loop_dio(loop):
                raise BenchError(f"{loop} has no direct I/O on {path}: the floor would measure the page cache")
            with swap_on(loop):
                yield Target(loop, lambda: {"direct_io": system.loop_dio(loop)}, lambda: {"floorfs": proc.pid})
    finally:
        if not system.loops_for(path):  # never under a loop device still attached
            _stop_floorfs(mnt, proc)


def _stop_floorfs(mnt: str, proc: subprocess.Popen[bytes]) -> None:
    """Unmount (lazily if it is busy: no loop device is on it any more) and stop floorfs."""
    if system.mount_type(mnt) == "fuse.floorfs":
        try:
            system.run(["umount", mnt])
        except system.CommandFailed:
            system.run(["umount", "-l", mnt])
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _vswapfs_report(state_dir: str) -> dict[str, Any]:
    """Pages written to the store and to the backing file in this run (vswapfs is new each
    run, so its counters are this run's), from its control socket, and the store's memory
    at its fullest; {} if it does not answer."""
    from vswapfs.control import ControlUnavailable, query

    state = State.load(state_dir)
    if state is None:
        return {}
    try:
        stats = query(state.control, 2.0)
    except ControlUnavailable:
        return {}
    out: dict[str, Any] = {}
    for key, name in (("pages_to_store", "host_writes"), ("pages_to_backing", "backing_writes")):
        if isinstance(stats.get(name), int):
            out[key] = stats[name]
    store = stats.get("inproc_store") if state.host == INPROC else _store_stats(state)
    full = store.get("fullest") if isinstance(store, dict) else None
    if isinstance(full, dict):
        out.update(fullest(full.get("data_bytes", 0), full.get("mem_bytes", 0)))
    return out


def _store_stats(state: State) -> dict[str, Any] | None:
    from .commands.common import StoreTarget, read_host_stats

    stats = read_host_stats(StoreTarget.of(state))
    return stats if isinstance(stats, dict) else None


@contextmanager
def vswapfs_swap(name: str, size: int, capacity: int, host: str | None, workdir: str,
                 say: Say, tier: str | None = None, compress: str = "off") -> Iterator[Target]:
    """A vswapfs device brought up as ``vswapctl up`` does, in a state directory of its own
    under ``workdir``.  A store it starts (a hoststore, or vswapfs's own in-process one)
    has its pressure source pinned at 0 % used:
    admission depends on its capacity alone, the same on every run (on a ``tier``, the
    cluster's memory is the pressure: its masters are sized to hold the workload).  ``up``'s and
    ``down``'s messages are kept back, but for warnings, and all of them if down stops."""
    state_dir = os.path.join(workdir, f"state-{name}")
    cfg = device.UpConfig(size=size, backing=os.path.join(workdir, f"{name}.backing"),
                          mountpoint=system.resolve_mountpoint(os.path.join(state_dir, "mnt")),
                          capacity=capacity, host=host, priority=PRIORITY,
                          extra_hoststore=["--tier", tier] if tier else [], compress=compress)
    if tier is None and (host is None or host == INPROC):
        pressure = os.path.join(workdir, "pressure-off")
        _write(pressure, "0\n")
        cfg.pressure_source = f"file:{pressure}"
    log: list[str] = []

    def keep(message: str) -> None:
        log.append(message)
        if message.startswith("warning"):
            say(f"{name}: {message}")

    try:
        state = device.bring_up(state_dir, cfg, keep)
    except (device.UpFailed, Busy) as exc:
        raise BenchError(f"{name}: vswapfs did not come up: {exc}") from None
    try:
        yield Target(state.loop, lambda: _vswapfs_report(state_dir), lambda: _vswapfs_daemons(state_dir))
    finally:
        log.clear()
        try:
            done = device.take_down(state_dir, keep)
        except (Busy, system.CommandFailed, OSError) as exc:
            log.append(f"down stopped: {exc}")
            done = False
        if not done:
            for message in log:
                say(f"{name}: {message}")
            raise BenchError(f"{name}: the vswapfs device in {state_dir} was not taken down (see above): left "
                             f"running; free memory, then: vswapctl --state-dir {state_dir} down")


def _vswapfs_daemons(state_dir: str) -> dict[str, int]:
    """The vswapfs daemon of the device in ``state_dir``, and the hoststore up started for it
    (each the very process recorded, not a pid used again)."""
    state = State.load(state_dir)
    if state is None:
        return {}
    ids = (("vswapfs", state.vswapfs_id), ("hoststore", state.hoststore_id))
    return {name: ident.pid for name, ident in ids if ident is not None and ident.alive()}


@contextmanager
def redis_cluster_swap(size: int, workdir: str, say: Say) -> Iterator[Target]:
    """A local cluster whose every master could hold the whole device (no refusal by
    memory), vswapfs on it; the cluster stops only once the device is down."""
    from . import rediscluster

    missing = rediscluster.redis_missing()
    if missing:
        raise BenchError(f"redis-cluster: {missing}")
    directory = os.path.join(workdir, "redis-cluster")
    try:
        address, _ = rediscluster.start(directory, maxmemory=str(2 * size))
    except rediscluster.ClusterError as exc:
        raise BenchError(f"redis-cluster: {exc}") from None
    try:
        with vswapfs_swap("redis-cluster", size, size, None, workdir, say, tier=address) as target:
            yield target
    finally:
        if State.load(os.path.join(workdir, "state-redis-cluster")) is None:
            rediscluster.stop(directory)
        else:
            say(f"redis-cluster: the device is still up: its cluster keeps running in {directory} "
                f"(tools/redis-cluster.sh down {directory} once the device is down)")


def open_target(name: str, workdir: str, device_size: int, small_capacity: int,
                say: Say) -> AbstractContextManager[Target]:
    if name in ZRAM_TARGETS:
        return zram_swap(device_size, name)
    if name in COMPRESSED_TARGETS:
        return vswapfs_swap(name, device_size, device_size, None, workdir, say, compress=COMPRESSED_TARGETS[name])
    if name == "loop":
        return loop_swap(device_size, workdir)
    if name == "floor":
        return floor_swap(device_size, workdir)
    if name == "inproc":
        return vswapfs_swap(name, device_size, device_size, "inproc", workdir, say)
    if name == "hoststore":
        return vswapfs_swap(name, device_size, device_size, None, workdir, say)
    if name == "hoststore-small":
        return vswapfs_swap(name, device_size, small_capacity, None, workdir, say)
    if name == "redis-cluster":
        return redis_cluster_swap(device_size, workdir, say)
    raise ValueError(f"unknown target {name!r}")


def state_dirs(workdir: str) -> list[str]:
    return [os.path.join(workdir, f"state-{name}") for name in VSWAPFS_TARGETS]
