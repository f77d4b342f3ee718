"""The in-process store (``--host inproc``): hoststore's admission rules, counters and
pressure hand-back inside vswapfs, under the pager's page rules."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from pagewire.messages import PAGE_SIZE, HandBackCause
from vswapfs import inproc, mount, options
from vswapfs.backing import Backing
from vswapfs.inproc import InprocStore
from vswapfs.pager import Pager

NPAGES = 64


def page(n: int, version: int) -> bytes:
    return random.Random(n * 1000 + version).randbytes(PAGE_SIZE)


class Pressure:
    """A pressure source the test steers."""

    def __init__(self) -> None:
        self.used = 10.0

    def __call__(self) -> Snapshot:
        return Snapshot(total=1 << 30, available=1 << 29, used_percent=self.used)


@pytest.fixture
def backing(disk_dir: str):
    b = Backing.open(os.path.join(disk_dir, "backing"), NPAGES * PAGE_SIZE)
    yield b
    b.close()


def make(backing: Backing, capacity: int = NPAGES, pressure: Pressure | None = None) -> tuple[Pager, InprocStore]:
    sampler = Sampler(interval=0.0, source=pressure or Pressure())
    store = InprocStore("test", backing.size, Limits(capacity_pages=capacity), sampler, handback_interval=0.01)
    return Pager(backing, store), store


async def test_pages_round_trip_in_memory(backing: Backing) -> None:
    pager, store = make(backing)
    data = [page(i, 1) for i in range(16)]
    await pager.write(0, b"".join(data))
    assert await pager.read(0, 16 * PAGE_SIZE) == b"".join(data)
    stats = store.stats()
    assert stats["accepted"] == 16 and stats["pages_stored"] == 16
    assert stats["get_requests"] == 0  # read straight from the store's memory, as shared memory is read
    ps = pager.stats()
    assert ps["host_writes"] == 16 and ps["backing_writes"] == 0 and ps["host_reads"] == ps["shared_reads"] == 16


async def test_capacity_overflow_goes_to_the_backing_file(backing: Backing) -> None:
    pager, store = make(backing, capacity=4)
    data = [page(i, 1) for i in range(10)]
    await pager.write(0, b"".join(data))
    assert store.stats()["refused_capacity"] == 6 and pager.stats()["backing_writes"] == 6
    assert await pager.read(0, 10 * PAGE_SIZE) == b"".join(data)


async def test_pressure_refuses_and_a_refused_rewrite_drops_the_old_copy(backing: Backing) -> None:
    pressure = Pressure()
    pager, store = make(backing, pressure=pressure)
    await pager.write(0, page(0, 1))
    pressure.used = 95.0
    await pager.write(0, page(0, 2))
    assert store.stats()["refused_pressure"] == 1 and store.stats()["stale_dropped"] == 1
    assert store.stats()["pages_stored"] == 0
    assert await pager.read(0, PAGE_SIZE) == page(0, 2)


async def until(done: Callable[[], bool], seconds: float = 5.0) -> None:
    """Until ``done()``, which the running store makes true (at most ``seconds``)."""
    with trio.fail_after(seconds):
        while not done():
            await trio.sleep(0.01)


async def test_pressure_hands_the_oldest_pages_back_to_the_backing_file(backing: Backing) -> None:
    pressure = Pressure()
    pager, store = make(backing, pressure=pressure)
    data = [page(i, 1) for i in range(32)]
    await pager.write(0, b"".join(data))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        pressure.used = 95.0
        await until(lambda: not store.stats()["pages_stored"])
        nursery.cancel_scope.cancel()
    assert store.stats()["handed_back_pressure"] == 32
    assert pager.stats()["handback_taken"] == 32 and pager.map.counts()["backing"] == 32
    assert await pager.read(0, 32 * PAGE_SIZE) == b"".join(data)


async def test_a_backing_file_that_fails_keeps_handed_back_pages_in_memory(backing: Backing, monkeypatch) -> None:
    pressure = Pressure()
    pager, store = make(backing, pressure=pressure)
    data = [page(i, 1) for i in range(8)]
    await pager.write(0, b"".join(data))

    async def broken(parts) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backing, "write_many", broken)
    pressure.used = 95.0
    freed = await store.hand_back(HandBackCause.PRESSURE, 8)
    assert freed == 0 and store.stats()["pages_stored"] == 8 and store.stats()["handback_failed"] == 8
    assert pager.stats()["handback_failed"] == 8
    assert await pager.read(0, 8 * PAGE_SIZE) == b"".join(data)  # still in memory, still right


async def test_a_failing_hand_back_handler_keeps_the_pages(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))

    async def explode(handback) -> bytes:
        raise RuntimeError("bug")

    store.set_handlers(explode, lambda: None)
    assert await store.hand_back(HandBackCause.PRESSURE, 8) == 0
    assert store.stats()["pages_stored"] == 1 and store.stats()["handback_errors"] == 1
    assert store.client.lent_count == 0  # nothing stays lent: it can be handed back later
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)


async def test_discard_and_release_drop_pages_from_memory(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, b"".join(page(i, 1) for i in range(8)))
    await pager.discard(0, 4 * PAGE_SIZE)
    assert store.stats()["pages_stored"] == 4 and store.stats()["invalidated"] == 4
    assert await pager.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)
    await pager.release_all()
    assert store.stats()["pages_stored"] == 0
    assert store.client.slab.mapped_bytes <= store.client.slab.chunk_pages * PAGE_SIZE  # memory given back


@pytest.mark.parametrize("argv, message", [
    (["--capacity", "1M"], "--capacity is for --host inproc"),
    (["--high-watermark", "50"], "--high-watermark is for --host inproc"),
])
def test_inproc_options_are_refused_for_a_store_daemon(argv: list[str], message: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        mount.main([str(tmp_path), "--backing", str(tmp_path / "b"), "--host", "unix:/nonexistent", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--token-file", "/etc/hostname"], "--token-file is for a store at an address"),
    (["--high-watermark", "50", "--low-watermark", "60"], "--low-watermark 60.0 is above --high-watermark 50.0"),
    (["--capacity", "1000"], "not a multiple of 4096"),
])
def test_bad_inproc_options_are_refused(argv: list[str], message: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        mount.main([str(tmp_path), "--backing", str(tmp_path / "b"), "--host", "inproc", *argv])
    assert message in capsys.readouterr().err


def test_inproc_defaults_to_the_device_size_and_the_usual_watermarks() -> None:
    args = options.build_parser().parse_args(["/mnt", "--backing", "/b", "--host", "inproc"])
    assert options.check_inproc_options(args, True) is None
    store = inproc.from_options(args, "n", 1 << 20)
    limits = store.store.limits
    assert (limits.capacity_pages, limits.high_percent, limits.low_percent) == (256, 90.0, 80.0)


async def test_a_one_page_read_is_served_at_once_unless_a_writer_holds_the_page(backing: Backing) -> None:
    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    assert await pager.read(0, PAGE_SIZE) == page(0, 1)
    assert pager.stats()["shared_reads"] == 1
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        async with pager.locks.exclusive(0, 1):  # a write of page 0 in progress
            nursery.start_soon(lambda: _append(got, pager.read(0, PAGE_SIZE)))
            await trio.testing.wait_all_tasks_blocked()
            assert not got and pager.locks.waiting() == 1  # the read waits for the writer, as on the general path
        with trio.fail_after(2):
            while not got:
                await trio.sleep(0.01)
    assert got == [page(0, 1)]


async def _append(out: list[bytes], read) -> None:
    out.append(await read)


async def test_the_in_process_store_checks_requests_as_the_wire_does(backing: Backing) -> None:
    """No message is built in process, so the store checks what a message would have:
    a put of part of a page, a get of nothing, an invalidate of no page are refused,
    and nothing is stored or dropped for them."""
    from array import array

    from vswapfs.pagestore import StoreError

    pager, store = make(backing)
    await pager.write(0, page(0, 1))
    for bad in (store.put(1, 2, b"x" * 100), store.put(1, 2, b""), store.put(1, 0, page(1, 1)),
                store.get(array("Q")), store.get(array("Q", [NPAGES])), store.invalidate(0, 0, 9),
                store.invalidate(NPAGES - 1, 2, 9)):
        with pytest.raises(StoreError):
            await bad
    assert store.store.pages == 1 and await pager.read(0, PAGE_SIZE) == page(0, 1)
