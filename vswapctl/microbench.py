"""``vswapctl microbench``: the page path without the kernel.

A pager (the same class vswapfs runs) writes and reads batches of pages
through a real hoststore process on a unix socket, with a backing file on
disk; no FUSE, no loop device, no swap.  Reports pages per second for writes
and reads of 1, 8, 64 and 256 pages, p50/p99 of a 1-page read, and what the
per-page integrity check (XXH3 over data, page number and version) costs on
each path, measured on the same batches.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import trio

from hoststore.address import Address
from hoststore.messages import PAGE_SIZE

from .benchstore import bench_store

BATCHES = (1, 8, 64, 256)


def _timed(n: int, fn: Any) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def integrity_cost(batch: int, rounds: int = 200) -> dict[str, float]:
    """Microseconds per page to checksum a written batch and to check a read one."""
    from vswapfs.integrity import checksum, checksums

    data = memoryview(os.urandom(batch * PAGE_SIZE))
    sums = checksums(data, 0, 7)
    write_s = _timed(rounds, lambda: checksums(data, 0, 7))

    def check() -> None:
        for i in range(batch):
            if checksum(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], i, 7) != sums[i]:
                raise AssertionError

    read_s = _timed(rounds, check)
    return {"write_us_per_page": write_s / rounds / batch * 1e6, "read_us_per_page": read_s / rounds / batch * 1e6}


async def _page_path(socket_path: str, backing_path: str, seconds: float) -> dict[str, Any]:
    from vswapfs.backing import Backing
    from vswapfs.hostclient import HostClient
    from vswapfs.pager import Pager

    npages = 65536
    backing = Backing.open(backing_path, npages * PAGE_SIZE)
    client = HostClient(Address("unix", path=socket_path), "microbench", npages * PAGE_SIZE)
    pager = Pager(backing, client)
    out: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(pager.drop_orphans)
            await client.wait_connected()
            payload = os.urandom(256 * PAGE_SIZE)
            region = 16384  # reads go here: 64 MiB, written in full first, all in the store
            for first in range(0, region, 256):
                await pager.write(first * PAGE_SIZE, payload)
            for batch in BATCHES:
                size = batch * PAGE_SIZE
                n = 0
                deadline = time.perf_counter() + seconds
                start = time.perf_counter()
                while time.perf_counter() < deadline:
                    first = region + (n * batch) % (npages - region - batch)
                    await pager.write(first * PAGE_SIZE, payload[:size])
                    n += 1
                write_rate = n * batch / (time.perf_counter() - start)
                n = 0
                latencies = []
                deadline = time.perf_counter() + seconds
                start = time.perf_counter()
                while time.perf_counter() < deadline:
                    first = (n * 7919 * batch) % (region - batch)
                    t = time.perf_counter()
                    await pager.read(first * PAGE_SIZE, size)
                    latencies.append(time.perf_counter() - t)
                    n += 1
                read_rate = n * batch / (time.perf_counter() - start)
                entry = {"write_pages_per_s": round(write_rate), "read_pages_per_s": round(read_rate)}
                if batch == 1:
                    latencies.sort()
                    entry["read_p50_us"] = round(statistics.median(latencies) * 1e6)
                    entry["read_p99_us"] = round(latencies[int(0.99 * (len(latencies) - 1))] * 1e6)
                cost = integrity_cost(batch)
                entry["checksum_write_us_per_page"] = round(cost["write_us_per_page"], 3)
                entry["checksum_read_us_per_page"] = round(cost["read_us_per_page"], 3)
                entry["checksum_share_of_write"] = round(cost["write_us_per_page"] * write_rate / 1e6, 4)
                entry["checksum_share_of_read"] = round(cost["read_us_per_page"] * read_rate / 1e6, 4)
                out[str(batch)] = entry
            stats = pager.stats()
            out["host_pages"] = stats["pages_host"]
            out["checksum_errors"] = stats["checksum_errors"]
            await pager.release_all()  # as vswapfs does at unmount: nothing left for the store to drain
            nursery.cancel_scope.cancel()
    finally:
        backing.close()
    return out


def run(seconds: float = 1.0, capacity: str = "512M") -> dict[str, Any]:
    with bench_store("vswapctl-microbench-", "--capacity", capacity) as (_, sock, workdir):
        result = trio.run(_page_path, sock, os.path.join(workdir, "backing"), seconds)
    result["params"] = {"seconds_per_measurement": seconds, "store_capacity": capacity,
                        "transport": "unix socket, msgpack"}
    return result

