"""A mounted FS-cache (``vswapctl cache up``): the tree as its users see it, against real daemons.

What a stacked filesystem's users expect (``cp -a``, ``tar``, ``git``) gives the same
tree through the mount as in LOWER; changes through the mount and behind its back are
seen; pages come back from the store once the mount's own page cache let them go
(``posix_fadvise(DONTNEED)`` on the mount's file: no machine-wide cache drop), and
LOWER's page cache does not keep a second copy of them.
"""

from __future__ import annotations

import hashlib
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from pagewire.address import Address
from pagewire.messages import PAGE_SIZE, Stats
from vswapctl import cachebench, cachemount
from vswapctl.device import Stopped
from vswapctl.procs import ProcessId
from vswapfs.hostclient import query

from .conftest import fuse_unavailable
from .daemons import wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable())),
              pytest.mark.skipif(os.geteuid() != 0, reason="cache up needs root")]


class Mounted:
    def __init__(self, base: str, host: str | None = None, **config: object) -> None:
        self.lower = os.path.join(base, "lower")
        self.mnt = os.path.join(base, "mnt")
        self.state_dir = os.path.join(base, "state")
        self.pressure = os.path.join(base, "pressure")
        os.makedirs(self.lower, exist_ok=True)
        cachebench.set_pressure(self.pressure, 10)
        self.cfg = cachemount.CacheConfig(self.lower, self.mnt, host=host, capacity=64 << 20,
                                          pressure_source=f"file:{self.pressure}", **config)  # type: ignore[arg-type]
        self.log: list[str] = []

    def up(self) -> "Mounted":
        cachemount.bring_up(self.state_dir, self.cfg, self.log.append)
        return self

    def down(self) -> None:
        state = cachemount.CacheState.load(self.state_dir)
        if state is not None:
            cachemount.take_down(self.state_dir, self.log.append)

    def stats(self) -> dict:
        state = cachemount.CacheState.load(self.state_dir)
        assert state is not None
        figures = cachemount.stats(state)
        assert figures is not None
        return figures

    def cache(self) -> dict:
        return self.stats()["cache"]

    def set_pressure(self, percent: int) -> None:
        cachebench.set_pressure(self.pressure, percent)


@pytest.fixture(params=["hoststore", "inproc"])
def mounted(disk_dir: str, request: pytest.FixtureRequest) -> Iterator[Mounted]:
    m = Mounted(disk_dir, host=None if request.param == "hoststore" else "inproc")
    try:
        yield m.up()
    finally:
        m.down()


NOBODY = 65534


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def forget_mount_pages(path: str) -> None:
    """Let the mount's own page cache go for one file (clean pages: as reclaim would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "a", "b"))
    for i, size in enumerate([0, 1, PAGE_SIZE - 1, PAGE_SIZE, 3 * PAGE_SIZE + 17, 300_000]):
        with open(os.path.join(root, "a", f"f{i}"), "wb") as f:
            f.write(os.urandom(size))
    os.symlink("f4", os.path.join(root, "a", "link"))
    os.symlink("/nowhere/at/all", os.path.join(root, "a", "b", "dangling"))
    os.link(os.path.join(root, "a", "f5"), os.path.join(root, "a", "b", "hard"))
    os.chmod(os.path.join(root, "a", "f1"), 0o640)
    os.setxattr(os.path.join(root, "a", "f3"), "user.note", b"kept")
    os.mkfifo(os.path.join(root, "a", "fifo"))


def tree_listing(root: str) -> list[tuple]:
    """What cp -a and tar must carry over: names, types, modes, owners, sizes, times, links, data."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            data = sha(path) if os.path.isfile(path) and not os.path.islink(path) else \
                os.readlink(path) if os.path.islink(path) else None
            out.append((rel, st.st_mode, st.st_uid, st.st_gid, st.st_size if not os.path.isdir(path) else 0,
                        st.st_mtime_ns // 10**9 if not os.path.islink(path) else 0, data))
    return sorted(out)


def test_cp_a_and_tar_through_the_mount_give_lowers_tree(mounted: Mounted, disk_dir: str) -> None:
    make_tree(os.path.join(mounted.lower, "src"))
    copy = os.path.join(disk_dir, "copy")
    subprocess.run(["cp", "-a", os.path.join(mounted.mnt, "src"), copy], check=True)
    assert tree_listing(copy) == tree_listing(os.path.join(mounted.lower, "src"))
    assert os.getxattr(os.path.join(copy, "a", "f3"), "user.note") == b"kept"
    assert os.stat(os.path.join(copy, "a", "f5")).st_ino == os.stat(os.path.join(copy, "a", "b", "hard")).st_ino
    # Into the mount: tar out of LOWER's copy, extract through the mount, compare in LOWER.
    archive = os.path.join(disk_dir, "t.tar")
    subprocess.run(["tar", "-C", copy, "--xattrs", "-cf", archive, "."], check=True)
    os.mkdir(os.path.join(mounted.mnt, "unpacked"))
    subprocess.run(["tar", "-C", os.path.join(mounted.mnt, "unpacked"), "--xattrs", "-xpf", archive], check=True)
    assert tree_listing(os.path.join(mounted.lower, "unpacked")) == tree_listing(copy)
    assert tree_listing(os.path.join(mounted.mnt, "unpacked")) == tree_listing(copy)
    assert mounted.cache()["io_errors"] == 0


def test_git_through_the_mount_sees_lowers_repository(mounted: Mounted) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": "/dev/null"}
    repo = os.path.join(mounted.mnt, "repo")

    def git(*args: str, where: str = repo) -> str:
        return subprocess.run(["git", "-C", where, *args], check=True, capture_output=True, text=True,
                              env=env).stdout

    os.mkdir(repo)
    git("init", "-q")
    make_tree(os.path.join(repo, "src"))
    os.unlink(os.path.join(repo, "src", "a", "fifo"))  # git keeps no fifos
    git("add", "-A")
    git("commit", "-qm", "tree")
    assert git("status", "--porcelain") == ""
    assert git("status", "--porcelain", where=os.path.join(mounted.lower, "repo")) == ""
    with open(os.path.join(mounted.lower, "repo", "src", "a", "f4"), "ab") as f:  # behind the mount's back
        f.write(b"more")
    assert git("status", "--porcelain") == " M src/a/f4\n"
    git("fsck", "--strict", "--no-progress")  # every object reads back whole


def test_writes_through_the_mount_are_read_back_at_once(mounted: Mounted) -> None:
    path, lower = os.path.join(mounted.mnt, "f"), os.path.join(mounted.lower, "f")
    data = bytearray(os.urandom(20 * PAGE_SIZE))
    with open(path, "wb") as f:
        f.write(data)
    assert sha(path) == sha(lower) == hashlib.sha256(data).hexdigest()
    forget_mount_pages(path)
    assert sha(path) == hashlib.sha256(data).hexdigest()  # now cached in the store
    forget_mount_pages(path)
    with open(path, "r+b") as f:  # a write across a page boundary, by another opener
        f.seek(5 * PAGE_SIZE - 3)
        f.write(b"XYZXYZ")
    data[5 * PAGE_SIZE - 3 : 5 * PAGE_SIZE + 3] = b"XYZXYZ"
    forget_mount_pages(path)
    assert sha(path) == sha(lower) == hashlib.sha256(data).hexdigest()
    os.truncate(path, 7 * PAGE_SIZE + 5)
    del data[7 * PAGE_SIZE + 5 :]
    os.truncate(path, 12 * PAGE_SIZE)
    data.extend(bytes(12 * PAGE_SIZE - len(data)))
    forget_mount_pages(path)
    assert sha(path) == hashlib.sha256(data).hexdigest()
    with open(path, "ab") as f:
        f.write(b"tail")
    data.extend(b"tail")
    forget_mount_pages(path)
    assert sha(path) == sha(lower) == hashlib.sha256(data).hexdigest()
    with open(path, "wb") as f:  # O_TRUNC at open (the kernel sends it with the open itself)
        f.write(b"short")
    os.truncate(path, 8 * PAGE_SIZE)  # what was cached past "short" must read as zeros now
    forget_mount_pages(path)
    assert open(path, "rb").read() == b"short" + bytes(8 * PAGE_SIZE - 5)
    c = mounted.cache()
    assert c["host_hits"] > 0 and c["invalidated_pages"] > 0 and c["lower_changes"] == 0 and c["io_errors"] == 0


def test_o_trunc_opens_truncate_whatever_the_access_and_leak_nothing(mounted: Mounted) -> None:
    """O_TRUNC comes with the open itself; opened read-only it still truncates (Linux does,
    for a caller who may write), through a descriptor of fscache's own, closed after."""
    path = os.path.join(mounted.mnt, "f")
    pid = mounted.stats()["pid"]
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    for flags in [os.O_RDONLY | os.O_TRUNC] * 50 + [os.O_WRONLY | os.O_TRUNC] * 50:
        with open(path, "wb") as f:
            f.write(b"x" * (3 * PAGE_SIZE))
        fd = os.open(path, flags)
        os.close(fd)
        assert os.stat(path).st_size == 0 == os.stat(os.path.join(mounted.lower, "f")).st_size
    assert len(os.listdir(f"/proc/{pid}/fd")) <= descriptors + 2  # what the kernel still knows, at most
    assert mounted.cache()["lower_changes"] == 0 and mounted.cache()["io_errors"] == 0


def test_rename_over_and_unlink_forget_the_file_gone(mounted: Mounted) -> None:
    a, b = os.path.join(mounted.mnt, "a"), os.path.join(mounted.mnt, "b")
    for path, byte in ((a, b"a"), (b, b"b")):
        with open(path, "wb") as f:
            f.write(byte * (8 * PAGE_SIZE))
        forget_mount_pages(path)
        assert sha(path)  # read through: cached
    held = mounted.cache()["cached_pages"]
    os.rename(a, b)
    assert open(b, "rb").read() == b"a" * (8 * PAGE_SIZE)
    assert mounted.cache()["cached_pages"] == held - 8  # b's old file is gone, and its pages with it
    os.unlink(b)
    assert mounted.cache()["cached_pages"] == held - 16
    assert not os.path.exists(os.path.join(mounted.lower, "b"))


def test_a_change_to_lower_behind_the_mounts_back_is_seen_at_the_next_open(mounted: Mounted) -> None:
    path, lower = os.path.join(mounted.mnt, "f"), os.path.join(mounted.lower, "f")
    with open(lower, "wb") as f:
        f.write(b"1" * (8 * PAGE_SIZE))
    assert sha(path) == sha(lower)
    forget_mount_pages(path)
    assert sha(path) == sha(lower)
    assert mounted.cache()["host_hits"] >= 8
    seen = os.stat(lower)
    fd = os.open(lower, os.O_WRONLY)
    os.pwrite(fd, b"2" * PAGE_SIZE, 3 * PAGE_SIZE)  # same size: only the times tell
    os.close(fd)
    # Timestamps are as fine as a clock tick: this test is about what the cache does with a
    # change it can see (docs/fscache.md, "the blind spot"), so the change is made visible.
    os.utime(lower, ns=(seen.st_atime_ns, seen.st_mtime_ns + 10**9))
    assert sha(path) == sha(lower)  # at once: open revalidates (and the kernel drops its copy)
    assert mounted.cache()["lower_changes"] == 1
    with open(lower, "ab") as f:  # it grows
        f.write(b"3" * 100)
    assert sha(path) == sha(lower)


def test_lowers_page_cache_holds_no_second_copy(mounted: Mounted) -> None:
    path, lower = os.path.join(mounted.mnt, "big"), os.path.join(mounted.lower, "big")
    with open(lower, "wb") as f:
        f.write(os.urandom(256 * PAGE_SIZE))
    fd = os.open(lower, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    want = sha(lower)
    forget_mount_pages(lower)  # that read's own pages (the helper works on any file)
    assert sha(path) == want
    forget_mount_pages(path)
    assert sha(path) == want  # from the store
    assert mounted.cache()["host_hits"] == 256
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", lower], check=True,
                         capture_output=True, text=True).stdout
    assert int(out.split()[0]) <= 256 * PAGE_SIZE // 10, out


def test_pressure_drops_the_pool_and_reads_stay_right(disk_dir: str) -> None:
    m = Mounted(disk_dir)
    try:
        m.up()
        path = os.path.join(m.mnt, "f")
        with open(os.path.join(m.lower, "f"), "wb") as f:
            f.write(os.urandom(512 * PAGE_SIZE))
        want = sha(os.path.join(m.lower, "f"))
        assert sha(path) == want
        state = cachemount.CacheState.load(m.state_dir)
        assert state is not None

        def store() -> dict:
            return trio.run(query, Address("unix", path=state.socket), Stats(), 2.0)

        assert store()["ephemeral_pages"] == 512
        m.set_pressure(99)
        wait_for(lambda: store()["ephemeral_pages"] == 0, 20, "the pool dropped")
        host = store()
        assert host["dropped_pressure"] == 512 and host["handed_back_pressure"] == 0
        forget_mount_pages(path)
        assert sha(path) == want
        assert m.cache()["stale_copies"] == 0
    finally:
        m.down()


def test_down_is_refused_while_the_mount_is_in_use(disk_dir: str) -> None:
    m = Mounted(disk_dir, host="inproc").up()
    try:
        with open(os.path.join(m.lower, "f"), "wb") as f:
            f.write(b"x")
        with open(os.path.join(m.mnt, "f"), "rb"):
            with pytest.raises(Stopped, match="umount"):
                cachemount.take_down(m.state_dir, m.log.append)
            assert cachemount.CacheState.load(m.state_dir) is not None
        assert cachemount.take_down(m.state_dir, m.log.append)
        assert not os.path.ismount(m.mnt)
    finally:
        m.down()


def test_up_refuses_a_mount_point_inside_lower(disk_dir: str) -> None:
    lower = os.path.join(disk_dir, "lower")
    os.makedirs(os.path.join(lower, "inside"))
    cfg = cachemount.CacheConfig(lower, os.path.join(lower, "inside"), host="inproc")
    with pytest.raises(cachemount.UpFailed, match="contain one another"):
        cachemount.bring_up(os.path.join(disk_dir, "state"), cfg, print)
    assert cachemount.CacheState.load(os.path.join(disk_dir, "state")) is None


def test_entries_made_through_the_mount_belong_to_their_user(mounted: Mounted, disk_dir: str) -> None:
    """The daemon (root) makes them; they are given to the caller, with the caller's umask
    only (not the daemon's as well)."""
    os.chmod(disk_dir, 0o755)
    shared = os.path.join(mounted.mnt, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    subprocess.run(["sh", "-c", "echo x > f && mkdir d && ln -s f l && mkfifo p && ln f h"], cwd=shared,
                   user=NOBODY, group=NOBODY, extra_groups=[], umask=0o002, check=True, capture_output=True)
    lower = os.path.join(mounted.lower, "shared")
    for name, mode in (("f", 0o664), ("d", 0o775), ("p", 0o664)):
        st = os.lstat(os.path.join(lower, name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, mode), name
    assert os.lstat(os.path.join(lower, "l")).st_uid == NOBODY
    assert os.stat(os.path.join(lower, "h")).st_nlink == 2
    # A user's write clears setuid, though the daemon writing LOWER holds CAP_FSETID (the kernel asks
    # fscache to clear it, with a setattr of the mode, before the write).
    suid = os.path.join(lower, "suid")
    with open(suid, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(suid, 0o4777)
    subprocess.run(["sh", "-c", "echo more >> suid"], cwd=shared, user=NOBODY, group=NOBODY, extra_groups=[],
                   check=True, capture_output=True)
    assert stat.S_IMODE(os.stat(suid).st_mode) == 0o777
    # And what the user may not do, the kernel refuses through the mount as in LOWER.
    os.chown(os.path.join(lower, "f"), 0, 0)
    os.chmod(os.path.join(lower, "f"), 0o600)
    denied = subprocess.run(["cat", os.path.join(shared, "f")], user=NOBODY, group=NOBODY, extra_groups=[],
                            capture_output=True)
    assert denied.returncode != 0


def test_many_files_open_at_once_from_a_low_open_file_limit(disk_dir: str) -> None:
    """Each file open through the mount costs fscache three descriptors (the kernel's
    node of it, the handle, the reader around LOWER's page cache): fscache raises its own
    limit, so a daemon started with the usual soft limit of 1024 serves 1000 open files,
    and a directory of 3000 entries lists whole with their attributes."""
    m = Mounted(disk_dir, host="inproc")
    big = os.path.join(m.lower, "big")
    os.mkdir(big)
    for i in range(3000):
        with open(os.path.join(big, f"f{i:04d}"), "w") as f:
            f.write(str(i))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        m.up()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        files = [open(os.path.join(m.mnt, "big", f"f{i:04d}")) for i in range(1000)]
        try:
            assert [f.read() for f in files] == [str(i) for i in range(1000)]
        finally:
            for f in files:
                f.close()
        done = subprocess.run(["ls", "-l", os.path.join(m.mnt, "big")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-300:]
        assert len(done.stdout.splitlines()) == 3001  # and "total"
        assert m.cache()["io_errors"] == 0
    finally:
        m.down()


def vswapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapctl", *args], capture_output=True, text=True, timeout=60)


def test_status_stats_top_record_and_metrics_know_the_cache(disk_dir: str) -> None:
    import json

    from fscache.cachestats import cache_families

    m = Mounted(disk_dir).up()
    try:
        with open(os.path.join(m.lower, "f"), "wb") as f:
            f.write(os.urandom(16 * PAGE_SIZE))
        path = os.path.join(m.mnt, "f")
        sha(path)
        forget_mount_pages(path)
        sha(path)
        stats = json.loads(vswapctl("--state-dir", m.state_dir, "stats", "--json").stdout)
        assert stats["cache"]["host_hits"] == 16 and stats["cache"]["lower_pages_read"] == 16
        assert stats["fscache"]["lower"] == m.lower and stats["fscache"]["host_connected"]
        assert "vswapfs" not in stats  # no device is up in that state directory
        status = json.loads(vswapctl("--state-dir", m.state_dir, "status", "--json").stdout)
        assert status["cache"]["mounted"] and status["cache"]["counters"]["host_hits"] == 16
        top = vswapctl("--state-dir", m.state_dir, "top", "--count", "1")
        assert top.returncode == 0 and "cache pages from store" in top.stdout, top.stderr
        record = os.path.join(disk_dir, "rec.jsonl")
        assert vswapctl("--state-dir", m.state_dir, "record", record, "--count", "2", "--interval", "0.1").returncode == 0
        with open(record) as f:
            samples = [json.loads(line) for line in f]
        assert samples[-1]["cache.host_hits"] == 16 and "cache.dropped.pressure" in samples[-1]
        names = {family.name for family in cache_families(m.stats())}
        assert {"vswap_cache_host_hits_pages", "vswap_cache_host_pages", "vswap_cache_dropped_pages"} <= names
    finally:
        m.down()
    assert "no device or cache is up" in vswapctl("--state-dir", m.state_dir, "top", "--count", "1").stderr


def test_signals_to_either_daemon_lose_nothing_and_down_tidies_up(disk_dir: str) -> None:
    """SIGKILL to the store: reads go on, right, from LOWER.  SIGTERM to fscache while a file
    is open: refused.  SIGKILL to fscache: a dead mount, which cache down takes away lazily
    (nothing is lost: LOWER holds every page)."""
    import signal

    m = Mounted(disk_dir).up()
    try:
        state = cachemount.CacheState.load(m.state_dir)
        assert state is not None and state.hoststore is not None and state.fscache is not None
        with open(os.path.join(m.lower, "f"), "wb") as f:
            f.write(os.urandom(64 * PAGE_SIZE))
        path, want = os.path.join(m.mnt, "f"), sha(os.path.join(m.lower, "f"))
        assert sha(path) == want
        os.kill(state.hoststore["pid"], signal.SIGKILL)
        wait_for(lambda: not m.stats()["host_connected"], 10, "fscache to see the store gone")
        forget_mount_pages(path)
        assert sha(path) == want
        assert m.cache()["io_errors"] == 0 and m.cache()["stale_copies"] == 0
        pid = state.fscache["pid"]
        with open(path, "rb"):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: "SIGTERM ignored" in open(state.log("fscache")).read(), 10, "the refusal")
            assert os.path.ismount(m.mnt)
        os.kill(pid, signal.SIGKILL)
        ident = ProcessId.from_dict(state.fscache)
        assert ident is not None
        wait_for(lambda: not ident.alive(), 10, "fscache to die")  # a zombie of this process's, then
        assert cachemount.take_down(m.state_dir, m.log.append)
        assert not os.path.ismount(m.mnt) and cachemount.CacheState.load(m.state_dir) is None
    finally:
        m.down()
