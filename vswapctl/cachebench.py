"""``vswapctl cache bench``: what the FS-cache buys, and how fast the host gets its memory back.

Two measurements, each repeated ``--runs`` times (medians reported, every run kept):

* **Reads.**  A tree of ``--tree`` bytes of incompressible files in a directory on
  disk (LOWER) is read whole (``vswapctl.treeread``) from a memory cgroup of
  ``--limit``, three ways: LOWER directly with its page cache dropped first (for
  those files only: ``posix_fadvise(DONTNEED)``, nothing machine-wide), and through a
  fresh cache mount twice (the first pass cold, the second served from the store as
  far as it holds the pages).  Every file's sha256 is checked against LOWER's, and
  after the second pass the report gives the share of whole pages that came from the
  store and how much of LOWER is resident in the page cache (``fincore``).
* **Memory back.**  ``--reclaim`` bytes of file data held two ways, and the time to
  free them: as the cache's pages in the store, dropped once the store's pressure
  source reads 99% (nothing is written anywhere: the store's hand-back counters must
  stay 0); and as page cache charged to a memory cgroup (the same files read directly
  from LOWER), reclaimed by lowering the cgroup's limit to 16 MiB, as a host squeezing
  a guest would.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vswapcommon.sizes import PAGE_SIZE

from . import cachemount, cgroup, launch
from .treeread import files

Say = Callable[[str], None]
FILE_SIZE = 4 << 20
SQUEEZED = 16 << 20  # the cgroup limit that reclaims the page cache
DROP_TIMEOUT = 120.0


class CacheBenchError(Exception):
    """The bench could not finish; the message says why (what it set up is taken down)."""


@dataclass
class CacheBenchConfig:
    directory: str  # on a disk filesystem: LOWER, the mount point and the state go here
    tree: int = 512 << 20
    limit: int = 64 << 20
    reclaim: int = 1 << 30
    runs: int = 3


def set_pressure(path: str, percent: int) -> None:
    """What a store with ``--pressure-source file:PATH`` reads as the host's used memory."""
    with open(path + ".tmp", "w") as f:
        f.write(f"{percent}\n")
    os.replace(path + ".tmp", path)


def make_tree(root: str, size: int, file_size: int = FILE_SIZE) -> dict[str, str]:
    """Incompressible files adding up to ``size`` under ``root``, written out and not left
    in the page cache; their sha256 by relative path."""
    sums = {}
    os.makedirs(root, exist_ok=True)
    for i in range(-(-size // file_size)):
        rel = os.path.join(f"d{i // 32:03d}", f"f{i:05d}")
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = os.urandom(min(file_size, size - i * file_size))
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def drop_page_cache(root: str) -> None:
    """Let the page cache of these files go (they are clean): a cold start for them alone."""
    for path in files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(root: str) -> int:
    """How much of these files the page cache holds now (util-linux fincore)."""
    paths = files(root)
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths], check=True,
                         capture_output=True, text=True).stdout
    return sum(int(word) for word in out.split())


def read_in_cgroup(root: str, limit: int, want: dict[str, str]) -> float:
    """Read the tree from a fresh memory cgroup of ``limit``; seconds.  Every sha256 checked."""
    cg = cgroup.create(f"vswapctl-cachebench-{os.getpid()}", limit)
    try:
        done = cg.run(launch.module_argv("vswapctl.treeread", root), cwd=launch.WORKDIR)
    finally:
        cg.remove()
    if done.returncode:
        raise CacheBenchError(f"reading {root} failed: {done.stderr.strip()[-300:]}")
    result = json.loads(done.stdout)
    if result["sha256"] != want:
        bad = sorted(k for k in want if result["sha256"].get(k) != want[k])
        raise CacheBenchError(f"{len(bad)} file(s) read back wrong through {root}, first {bad[:3]}")
    return float(result["seconds"])


def _store_stats(state: cachemount.CacheState) -> dict[str, Any]:
    import trio

    from pagewire.address import Address
    from pagewire.messages import Stats
    from vswapfs.hostclient import query

    return trio.run(query, Address("unix", path=state.socket), Stats(), 5.0)


class _Cache:
    """A cache mount of LOWER for one run, with a store of its own whose pressure we set."""

    def __init__(self, cfg: CacheBenchConfig, lower: str, say: Say) -> None:
        self.pressure = os.path.join(cfg.directory, "pressure")
        self._set(10)
        self.state_dir = os.path.join(cfg.directory, "state")
        self.mnt = os.path.join(cfg.directory, "mnt")
        held = cfg.tree + cfg.reclaim
        self.cfg = cachemount.CacheConfig(lower, self.mnt, capacity=held + (64 << 20), size=2 * held,
                                          pressure_source=f"file:{self.pressure}")
        self.say = say

    def _set(self, percent: int) -> None:
        set_pressure(self.pressure, percent)

    def __enter__(self) -> "_Cache":
        self.state = cachemount.bring_up(self.state_dir, self.cfg, lambda m: None)
        return self

    def __exit__(self, *exc: object) -> None:
        cachemount.take_down(self.state_dir, lambda m: None)

    def counters(self) -> dict[str, Any]:
        stats = cachemount.stats(self.state)
        if stats is None:
            raise CacheBenchError("fscache does not answer")
        return stats["cache"]

    def drop_all(self) -> tuple[float, int, dict[str, Any]]:
        """Pressure on: seconds until the store holds none of the cache's pages; pages dropped."""
        before = _store_stats(self.state)["ephemeral_pages"]
        start = time.monotonic()
        self._set(99)
        while (now := _store_stats(self.state))["ephemeral_pages"]:
            if time.monotonic() - start > DROP_TIMEOUT:
                raise CacheBenchError(f"the store still held {now['ephemeral_pages']} pages after {DROP_TIMEOUT}s")
            time.sleep(0.005)
        return time.monotonic() - start, before, now


def _one_run(cfg: CacheBenchConfig, lower: str, want: dict[str, str], want_b: dict[str, str],
             say: Say) -> dict[str, Any]:
    a, b = os.path.join(lower, "a"), os.path.join(lower, "b")
    drop_page_cache(a)
    sample: dict[str, Any] = {"lower_cold": read_in_cgroup(a, cfg.limit, want)}
    drop_page_cache(a)  # what that read left in the cgroup's page cache is not the cache's doing
    with _Cache(cfg, lower, say) as cache:
        mnt_a, mnt_b = os.path.join(cache.mnt, "a"), os.path.join(cache.mnt, "b")
        sample["cache_first"] = read_in_cgroup(mnt_a, cfg.limit, want)
        c1 = cache.counters()
        sample["cache_second"] = read_in_cgroup(mnt_a, cfg.limit, want)
        c2 = cache.counters()
        hits, misses = c2["host_hits"] - c1["host_hits"], c2["host_misses"] - c1["host_misses"]
        sample["second_pass_host_share"] = round(hits / max(1, hits + misses), 4)
        sample["lower_resident_share"] = round(resident_bytes(a) / cfg.tree, 4)
        read_in_cgroup(mnt_b, cfg.limit, want_b)
        seconds, pages, host = cache.drop_all()
        sample["drop_seconds"] = round(seconds, 4)
        sample["dropped_bytes"] = pages * PAGE_SIZE
        sample["handed_back_pages"] = sum(v for k, v in host.items() if k.startswith("handed_back_"))
    sample["reclaim_seconds"], sample["reclaimed_bytes"] = squeeze_page_cache(b, cfg.reclaim, want_b)
    say(f"run: LOWER cold {sample['lower_cold']:.2f}s, cache {sample['cache_first']:.2f}s then "
        f"{sample['cache_second']:.2f}s ({100 * sample['second_pass_host_share']:.0f}% from the store, LOWER "
        f"{100 * sample['lower_resident_share']:.1f}% resident); {sample['dropped_bytes'] >> 20} MiB back by "
        f"dropping in {sample['drop_seconds']:.3f}s, {sample['reclaimed_bytes'] >> 20} MiB by reclaim in "
        f"{sample['reclaim_seconds']:.3f}s")
    return sample


def squeeze_page_cache(root: str, size: int, want: dict[str, str]) -> tuple[float, int]:
    """Fill a cgroup with ``root``'s page cache (read directly), then lower its limit to
    SQUEEZED: seconds the kernel took to reclaim, bytes reclaimed."""
    drop_page_cache(root)
    cg = cgroup.create(f"vswapctl-cachebench-{os.getpid()}", size + (256 << 20))
    try:
        done = cg.run(launch.module_argv("vswapctl.treeread", root), cwd=launch.WORKDIR)
        if done.returncode:
            raise CacheBenchError(f"reading {root} failed: {done.stderr.strip()[-300:]}")
        usage = _usage(cg)
        start = time.monotonic()
        _limit(cg, SQUEEZED)
        seconds = time.monotonic() - start
        return seconds, usage - _usage(cg)
    finally:
        cg.remove()


def _usage(cg: cgroup.MemoryCgroup) -> int:
    name = "memory.usage_in_bytes" if cg.version == 1 else "memory.current"
    with open(os.path.join(cg.path, name)) as f:
        return int(f.read())


def _limit(cg: cgroup.MemoryCgroup, limit: int) -> None:
    """Lower the limit: the kernel reclaims down to it before the write returns."""
    name = "memory.limit_in_bytes" if cg.version == 1 else "memory.max"
    fd = os.open(os.path.join(cg.path, name), os.O_WRONLY)
    try:
        os.write(fd, str(limit).encode())
    finally:
        os.close(fd)


def run(cfg: CacheBenchConfig, say: Say) -> dict[str, Any]:
    lower = os.path.join(cfg.directory, "lower")
    say(f"writing {cfg.tree >> 20} MiB and {cfg.reclaim >> 20} MiB of files under {lower}")
    want = make_tree(os.path.join(lower, "a"), cfg.tree)
    want_b = make_tree(os.path.join(lower, "b"), cfg.reclaim)
    samples = [_one_run(cfg, lower, want, want_b, say) for _ in range(cfg.runs)]
    medians = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    medians["second_pass_vs_lower_cold"] = round(medians["cache_second"] / medians["lower_cold"], 3)
    medians["drop_vs_reclaim"] = round(medians["drop_seconds"] / medians["reclaim_seconds"], 3)
    return {"config": {"tree": cfg.tree, "limit": cfg.limit, "reclaim": cfg.reclaim, "runs": cfg.runs},
            "medians": medians, "runs": samples}
