"""The cache's pager without FUSE: what it serves, from where, and that it is never stale.

Each test drives :class:`fscache.pagecache.PageCache` over the fake store (the real
hoststore ``Store`` behind the page-store contract, here as an ephemeral pool) and an
in-memory LOWER, and checks the bytes read against LOWER and the cache's counters.
"""

from __future__ import annotations


import errno
import os
import stat

import pytest
import trio
import trio.testing

from fscache.counters import CacheCounter as C
from fscache.lowerfile import PageReader
from fscache.pagecache import SHUN_TIMEOUTS, PageCache
from pagewire.messages import PAGE_SIZE, POOL_EPHEMERAL

from .fakelower import Lower, change_through
from .fakestore import FakeStore

SLOTS = 64


def make(slots: int = SLOTS, capacity: int | None = None) -> tuple[PageCache, FakeStore, Lower]:
    store = FakeStore(slots, capacity, pool=POOL_EPHEMERAL)
    return PageCache(store, slots, store_timeout=0.5), store, Lower()


def blob(n: int, tag: int = 0) -> bytes:
    return bytes((i * 7 + tag) % 251 for i in range(n))


async def read_all(cache: PageCache, lower: Lower, ino: int, size: int | None = None) -> bytes:
    f, _ = cache.opened(lower.ident(ino))
    try:
        return await cache.read(f, lower.reader(ino), 0, size if size is not None else len(lower.data[ino]) + 100)
    finally:
        cache.closed(f)


async def test_second_read_comes_from_the_store_checked() -> None:
    cache, store, lower = make()
    lower.create(1, blob(10 * PAGE_SIZE + 123))
    assert await read_all(cache, lower, 1) == lower.data[1]
    c = cache.counters
    assert c[C.HOST_STORED] == 10 and c[C.HOST_MISSES] == 10 and c[C.HOST_HITS] == 0
    assert lower.reads == 11  # ten whole pages and the tail, which is never offered
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert c[C.HOST_HITS] == 10 and lower.reads == 12  # only the tail again
    assert store.pages_stored == 10


async def test_a_read_in_the_middle_of_a_page_and_past_the_end() -> None:
    cache, _, lower = make()
    lower.create(1, blob(3 * PAGE_SIZE))
    f, _ = cache.opened(lower.ident(1))
    read = lower.reader(1)
    assert await cache.read(f, read, 100, 5000) == lower.data[1][100:5100]
    assert await cache.read(f, read, 2 * PAGE_SIZE + 10, 10 * PAGE_SIZE) == lower.data[1][2 * PAGE_SIZE + 10 :]
    assert await cache.read(f, read, 5 * PAGE_SIZE, PAGE_SIZE) == b""
    assert await cache.read(f, read, 100, 5000) == lower.data[1][100:5100]  # now from the store
    assert cache.counters[C.HOST_HITS] == 2


async def test_a_write_forgets_exactly_the_pages_it_touches() -> None:
    cache, _, lower = make()
    lower.create(1, blob(8 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    f, _ = cache.opened(lower.ident(1))
    await change_through(cache, f, lower, 1, 3 * PAGE_SIZE + 10, b"x" * PAGE_SIZE)  # pages 3 and 4
    assert sorted(f.pages) == [0, 1, 2, 5, 6, 7]
    assert cache.counters[C.INVALIDATED_PAGES] == 2 and cache.counters[C.LOWER_CHANGES] == 0
    before = lower.reads
    assert await cache.read(f, lower.reader(1), 0, 8 * PAGE_SIZE) == lower.data[1]
    assert lower.reads - before == 2  # the two it forgot; the rest from the store
    cache.closed(f)
    _, same = cache.opened(lower.ident(1))
    assert same  # the write was the cache's own: the kernel may keep its pages


async def test_a_truncate_forgets_the_page_it_cuts_and_all_after() -> None:
    cache, _, lower = make()
    lower.create(1, blob(6 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    f, _ = cache.opened(lower.ident(1))
    await change_through(cache, f, lower, 1, 0, truncate=2 * PAGE_SIZE + 5)
    assert sorted(f.pages) == [0, 1]
    await change_through(cache, f, lower, 1, 0, truncate=6 * PAGE_SIZE)  # grows again: zeros, not old data
    assert await cache.read(f, lower.reader(1), 0, 6 * PAGE_SIZE) == lower.data[1]
    assert lower.data[1][3 * PAGE_SIZE :] == bytes(3 * PAGE_SIZE)


async def test_a_change_behind_the_mounts_back_is_seen_at_the_next_open() -> None:
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    lower.write(1, PAGE_SIZE, b"behind" * 100)  # same size: only the times tell
    f, same = cache.opened(lower.ident(1))
    assert not same and not f.pages and cache.counters[C.LOWER_CHANGES] == 1
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]


async def test_a_change_behind_the_mounts_back_is_seen_before_a_write_through_it() -> None:
    """Else the write would record the file's new identity as its own doing, and the
    pages changed behind its back would be served stale."""
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE))
    f, _ = cache.opened(lower.ident(1))
    await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE)
    lower.write(1, 0, b"behind")
    await change_through(cache, f, lower, 1, 3 * PAGE_SIZE, b"through")
    assert not f.pages and cache.counters[C.LOWER_CHANGES] == 1
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]


async def test_a_new_file_on_a_reused_inode_number_is_not_served_the_old_pages() -> None:
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE, tag=1))
    await read_all(cache, lower, 1)
    lower.replace(1, blob(4 * PAGE_SIZE, tag=2))
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert cache.counters[C.LOWER_CHANGES] == 1 and cache.counters[C.HOST_HITS] == 0


async def test_pages_the_store_dropped_are_read_from_lower() -> None:
    cache, store, lower = make()
    lower.create(1, blob(8 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    assert store.drop(5) == 5 and store.pages_stored == 3
    assert await read_all(cache, lower, 1) == lower.data[1]
    c = cache.counters
    assert c[C.HOST_HITS] == 3 and c[C.STALE_COPIES] == 0
    assert store.store.client_counters["fake"]["dropped_pressure"] == 5
    assert await read_all(cache, lower, 1) == lower.data[1]  # offered again after the miss
    assert c[C.HOST_HITS] == 3 + 8


async def test_refused_pages_are_not_cached() -> None:
    cache, store, lower = make()
    store.refuse_every = 2
    lower.create(1, blob(8 * PAGE_SIZE))
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert cache.counters[C.HOST_REFUSED] == 4 and cache.slots.used == 4
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert cache.counters[C.HOST_HITS] == 4


@pytest.mark.parametrize("lie", ["data", "seq"])
async def test_a_lying_store_is_a_miss_never_data(lie: str) -> None:
    cache, store, lower = make()
    lower.create(1, blob(2 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    store.lie = lie
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert cache.counters[C.STALE_COPIES] == 1 and cache.counters[C.HOST_HITS] == 1


async def test_a_store_that_lost_our_pages() -> None:
    cache, store, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    store.kill()
    store.reconnect()
    assert cache.counters[C.STORE_LOST] == 1 and cache.slots.used == 0
    assert await read_all(cache, lower, 1) == lower.data[1]


async def test_a_store_away_or_stalled_costs_a_read_of_lower_only(autojump_clock: trio.testing.MockClock) -> None:
    cache, store, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    store.stalled = True
    start = trio.current_time()
    assert await read_all(cache, lower, 1) == lower.data[1]  # the get timed out, and nothing was offered
    assert trio.current_time() - start == pytest.approx(cache.store_timeout)
    assert cache.counters[C.OFFER_FAILED] == 4 and cache.counters[C.HOST_HITS] == 0
    start = trio.current_time()
    assert await read_all(cache, lower, 1) == lower.data[1]  # the store is left alone for a while
    assert trio.current_time() == start
    store.release()
    store.disconnect()
    await trio.sleep(SHUN_TIMEOUTS * cache.store_timeout)
    assert await read_all(cache, lower, 1) == lower.data[1]  # away: not even asked
    store.reconnect()
    assert await read_all(cache, lower, 1) == lower.data[1]
    assert cache.counters[C.HOST_HITS] == 4  # the pages it had all along


async def test_an_offer_overtaken_by_a_write_is_not_kept(autojump_clock: trio.testing.MockClock) -> None:
    """The read took LOWER's pages before the write; the write was answered while the
    offer was on the wire; the store then took the old pages.  They must not be served."""
    cache, store, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE, tag=1))
    f, _ = cache.opened(lower.ident(1))
    store.latency = 0.1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.read, f, lower.reader(1), 0, 4 * PAGE_SIZE)
        await trio.sleep(0.05)  # the read's put is on the wire
        await change_through(cache, f, lower, 1, 0, blob(4 * PAGE_SIZE, tag=2))
    assert cache.counters[C.HOST_STORED] == 4 and cache.counters[C.OFFER_RACED] == 4 and not f.pages
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]


async def test_slots_are_a_ring_the_oldest_reused_first() -> None:
    cache, _, lower = make(slots=8)
    lower.create(1, blob(6 * PAGE_SIZE, tag=1))
    lower.create(2, blob(6 * PAGE_SIZE, tag=2))
    await read_all(cache, lower, 1)
    await read_all(cache, lower, 2)
    assert cache.counters[C.EVICTED_PAGES] == 4
    f1, _ = cache.opened(lower.ident(1))
    assert sorted(f1.pages) == [4, 5]
    assert await cache.read(f1, lower.reader(1), 0, 6 * PAGE_SIZE) == lower.data[1]
    assert await read_all(cache, lower, 2) == lower.data[2]


async def test_an_unlinked_file_is_forgotten_and_its_handles_still_read_lower() -> None:
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE))
    f, _ = cache.opened(lower.ident(1))
    await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE)
    cache.gone((1, 1))
    assert not f.pages and cache.slots.used == 0 and (1, 1) not in cache.files
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]
    assert not f.pages  # an open handle on a file that is gone caches nothing
    cache.closed(f)


async def test_a_file_neither_open_nor_cached_keeps_no_record() -> None:
    cache, store, lower = make()
    lower.create(1, blob(PAGE_SIZE - 1))  # no whole page: nothing to cache
    await read_all(cache, lower, 1)
    assert cache.files == {}
    lower.create(2, blob(2 * PAGE_SIZE))
    await read_all(cache, lower, 2)
    assert (1, 2) in cache.files
    store.drop(2)
    assert await read_all(cache, lower, 2) == lower.data[2]  # the misses free its slots, then it is offered again
    assert (1, 2) in cache.files


async def test_release_store_copies_gives_the_store_its_memory_back() -> None:
    cache, store, lower = make()
    lower.create(1, blob(8 * PAGE_SIZE))
    await read_all(cache, lower, 1)
    assert store.pages_stored == 8
    await cache.release_store_copies()
    assert store.pages_stored == 0


async def test_what_a_read_takes_from_lower_during_a_change_is_not_kept() -> None:
    """A read arriving while a truncate is on its way to LOWER (readahead, an O_DIRECT
    reader) reads what is about to go: the pages it read must not come back later, when
    the file grows again and they should read as zeros."""
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE, tag=1))
    f, _ = cache.opened(lower.ident(1))

    async def read_meanwhile() -> None:
        assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]  # still the old bytes

    await change_through(cache, f, lower, 1, 0, truncate=PAGE_SIZE, during=read_meanwhile)
    assert not f.pages and cache.counters[C.HOST_OFFERED] == 0
    await change_through(cache, f, lower, 1, 0, truncate=4 * PAGE_SIZE)
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]
    assert lower.data[1][PAGE_SIZE:] == bytes(3 * PAGE_SIZE)


@pytest.mark.parametrize("refuses", ["open", "read"])
def test_lower_refusing_o_direct_is_read_with_dontneed(disk_dir: str, monkeypatch: pytest.MonkeyPatch,
                                                       refuses: str) -> None:
    """Where a filesystem refuses O_DIRECT (at open, or only at the first read), the reader
    falls back to plain reads and DONTNEED, and still reads right."""
    path = os.path.join(disk_dir, "f")
    with open(path, "wb") as f:
        f.write(b"q" * (3 * PAGE_SIZE + 5))
    real_open, real_preadv = os.open, os.preadv
    advised = []

    def refusing_open(name, flags, *args, **kwargs):
        if refuses == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(name, flags, *args, **kwargs)

    def refusing_preadv(*args):
        raise OSError(errno.EINVAL, "no direct reads here")

    monkeypatch.setattr(os, "open", refusing_open)
    if refuses == "read":
        monkeypatch.setattr(os, "preadv", refusing_preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append((off, n, advice)))
    reader = PageReader(path)
    try:
        assert reader.direct == (refuses == "read")
        assert reader.read(1, 5) == b"q" * (2 * PAGE_SIZE + 5)
        assert not reader.direct and advised == [(PAGE_SIZE, 5 * PAGE_SIZE, os.POSIX_FADV_DONTNEED)]
    finally:
        reader.close()
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "preadv", real_preadv)
    with pytest.raises(FileNotFoundError):
        PageReader(os.path.join(disk_dir, "missing"))


@pytest.mark.parametrize("argv,said", [
    (["cache", "up", "/", "/mnt", "--host", "inproc", "--policy", "accept-all"], "--policy is for a store daemon"),
    (["cache", "up", "/", "/mnt", "--host", "unix:/run/x.sock", "--compress", "lz4"], "a store at --host has its own"),
    (["cache", "up", "/", "/mnt", "--token-file", "/etc/passwd"], "--token-file is for a store at --host"),
    (["cache", "up", "/", "/mnt", "--host", "tcp:10.0.0.1:7000"], "token"),
])
def test_cache_up_refuses_options_that_mean_nothing_here(argv: list[str], said: str, tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vswapctl", "--state-dir", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and said in done.stderr, done.stderr
    assert not os.path.exists(os.path.join(tmp_path, "cache", "cache.json"))


@pytest.mark.parametrize("argv,said", [
    (["/nonexistent", "MNT"], "is not a directory"),
    (["LOWER", "LOWER/inside"], "must not contain one another"),
    (["LOWER", "MNT", "--size", "1000"], "not a positive multiple"),
    (["LOWER", "MNT", "--capacity", "64M", "--host", "unix:/run/x.sock"], "is for --host inproc"),
])
def test_fscache_refuses_bad_arguments_in_one_line(argv: list[str], said: str, tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "LOWER" / "inside").mkdir(parents=True)
    (tmp_path / "MNT").mkdir()
    argv = [str(tmp_path / a) if a.startswith(("LOWER", "MNT")) else a for a in argv]
    done = subprocess.run([sys.executable, "-m", "fscache", *argv, *([] if "--host" in argv else ["--host", "inproc"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and said in done.stderr, done.stderr


async def test_a_change_to_lower_during_a_change_through_the_mount_is_not_taken_for_its_own() -> None:
    """A write through the mount is in progress when LOWER's file grows behind its back:
    the identity after it is not the write's doing, so nothing of the file is kept, and its
    next open tells the kernel to drop what it holds."""
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE, tag=1))
    f, _ = cache.opened(lower.ident(1))
    await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE)
    assert len(f.pages) == 4

    async def behind() -> None:
        lower.write(1, 4 * PAGE_SIZE, b"appended behind its back")

    await change_through(cache, f, lower, 1, 0, b"through", during=behind)
    assert not f.pages and cache.counters[C.LOWER_CHANGES] == 1
    cache.closed(f)
    f, same = cache.opened(lower.ident(1))
    assert not same and cache.counters[C.LOWER_CHANGES] == 1  # in doubt, not counted twice
    assert await cache.read(f, lower.reader(1), 0, 8 * PAGE_SIZE) == lower.data[1]


async def test_overlapping_changes_through_the_mount_keep_nothing_they_cannot_explain() -> None:
    cache, _, lower = make()
    lower.create(1, blob(4 * PAGE_SIZE, tag=1))
    f, _ = cache.opened(lower.ident(1))
    await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE)

    async def another() -> None:
        await change_through(cache, f, lower, 1, 3 * PAGE_SIZE, b"second")

    await change_through(cache, f, lower, 1, 0, b"first", during=another)
    assert not f.pages and cache.counters[C.LOWER_CHANGES] == 0
    assert await cache.read(f, lower.reader(1), 0, 4 * PAGE_SIZE) == lower.data[1]
    cache.closed(f)


class Ctx:
    def __init__(self, uid: int, gid: int = 0) -> None:
        self.uid, self.gid, self.umask = uid, gid, 0o022


def test_a_file_made_for_a_user_is_theirs_and_replaces_nothing(disk_dir: str) -> None:
    from fscache import lowercalls

    parent = os.open(disk_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        fd, opath, st = lowercalls.make_file(parent, b"new", os.O_RDWR, 0o640, (1234, 5678))
        os.close(fd)
        os.close(opath)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
        with pytest.raises(FileExistsError):
            lowercalls.make_file(parent, b"new", os.O_RDWR, 0o600, None)
        with pytest.raises(FileExistsError):
            lowercalls.make_entry(parent, b"new", lambda n: os.mkdir(n, dir_fd=parent), None)
        assert sorted(os.listdir(disk_dir)) == ["new"]  # no temporary name left behind
        assert os.stat(os.path.join(disk_dir, "new")).st_uid == 1234  # not replaced
        opath, st = lowercalls.make_entry(parent, b"link", lambda n: os.symlink("new", n, dir_fd=parent), (42, 43))
        os.close(opath)
        assert stat.S_ISLNK(st.st_mode) and (os.lstat(os.path.join(disk_dir, "link")).st_uid, st.st_gid) == (42, 43)
    finally:
        os.close(parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="opens other users' files as root")
def test_a_create_that_meets_a_planted_entry_opens_it_only_if_the_caller_may(disk_dir: str) -> None:
    from fscache.fileops import _open_existing

    parent = os.open(disk_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        os.mkfifo(os.path.join(disk_dir, "fifo"))  # never opened: it would block the worker for ever
        with pytest.raises(FileExistsError):
            _open_existing(parent, b"fifo", os.O_RDONLY, Ctx(1000))
        secret = os.path.join(disk_dir, "secret")
        with open(secret, "w") as f:
            f.write("root's")
        os.chmod(secret, 0o600)
        with pytest.raises(PermissionError):
            _open_existing(parent, b"secret", os.O_RDWR, Ctx(1000))
        os.chown(secret, 1000, 1000)
        fd, opath, st = _open_existing(parent, b"secret", os.O_RDWR, Ctx(1000))
        assert os.read(fd, 10) == b"root's" and st.st_uid == 1000
        os.close(fd)
        os.close(opath)
    finally:
        os.close(parent)


async def test_a_stalled_store_costs_a_large_read_one_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A read of many pages asks in several gets and offers in several puts: once one has
    timed out, the rest of the read goes to LOWER alone."""
    cache, store, lower = make(slots=1024)
    lower.create(1, blob(600 * PAGE_SIZE))
    assert await read_all(cache, lower, 1) == lower.data[1]
    store.stalled = True
    start = trio.current_time()
    assert await read_all(cache, lower, 1) == lower.data[1]  # three gets' worth of pages
    assert trio.current_time() - start == pytest.approx(cache.store_timeout)
    store.release()
    cache2, store2, lower2 = make(slots=1024)
    store2.stalled = True
    lower2.create(1, blob(600 * PAGE_SIZE))
    start = trio.current_time()
    assert await read_all(cache2, lower2, 1) == lower2.data[1]  # ten puts' worth of pages
    assert trio.current_time() - start == pytest.approx(cache2.store_timeout)
    assert cache2.counters[C.OFFER_FAILED] == 600
    store2.release()
