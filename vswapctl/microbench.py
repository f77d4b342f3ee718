"""``vswapctl microbench``: the page path without the kernel, for each transport.

A pager (the same class vswapfs runs) writes and reads batches of pages
through each kind of store, with a backing file on disk; no FUSE, no loop
device, no swap.  The transports: ``inproc`` (the store inside the pager's
process, the floor), ``unix+shared`` (a hoststore process on a unix socket,
pages read from the memory it shares with this client alone), ``unix`` (the
same socket, every page on the wire) and ``tcp`` (loopback).  For each:
pages per second for writes and reads of 1, 8, 64 and 256 pages, and p50/p99
of a 1-page read; and, once, what the per-page integrity check (XXH3 over
data, page number and version) costs, measured on the same batches.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import trio

from pagewire.address import Address
from pagewire.messages import PAGE_SIZE

from .benchstore import bench_store

BATCHES = (1, 8, 64, 256)
TRANSPORTS = ("inproc", "unix+shared", "unix", "tcp")
NPAGES = 65536
REGION = 16384  # reads go here: 64 MiB, written in full first, all in the store


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


async def _measure(pager: Any, seconds: float) -> dict[str, Any]:
    """Writes then reads of every batch size through ``pager``, whose store is up."""
    payload = os.urandom(256 * PAGE_SIZE)
    for first in range(0, REGION, 256):
        await pager.write(first * PAGE_SIZE, payload)
    out: dict[str, Any] = {}
    for batch in BATCHES:
        size = batch * PAGE_SIZE
        n = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            first = REGION + (n * batch) % (NPAGES - REGION - batch)
            await pager.write(first * PAGE_SIZE, payload[:size])
            n += 1
        write_rate = n * batch / (time.perf_counter() - start)
        n = 0
        latencies = []
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            first = (n * 7919 * batch) % (REGION - batch)
            t = time.perf_counter()
            await pager.read(first * PAGE_SIZE, size)
            latencies.append(time.perf_counter() - t)
            n += 1
        read_rate = n * batch / (time.perf_counter() - start)
        entry: dict[str, Any] = {"write_pages_per_s": round(write_rate), "read_pages_per_s": round(read_rate)}
        if batch == 1:
            latencies.sort()
            entry["read_p50_us"] = round(statistics.median(latencies) * 1e6)
            entry["read_p99_us"] = round(latencies[int(0.99 * (len(latencies) - 1))] * 1e6)
        out[str(batch)] = entry
    stats = pager.stats()
    out["host_pages"] = stats["pages_host"]
    out["shared_reads"] = stats.get("shared_reads", 0)
    out["checksum_errors"] = stats["checksum_errors"]
    await pager.release_all()  # as vswapfs does at unmount: nothing left for the store to drain
    return out


async def _through(make_store: Callable[[int], Any], backing_path: str, seconds: float) -> dict[str, Any]:
    from vswapfs.backing import Backing
    from vswapfs.pager import Pager

    backing = Backing.open(backing_path, NPAGES * PAGE_SIZE)
    try:
        store = make_store(NPAGES * PAGE_SIZE)
        pager = Pager(backing, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.start_soon(pager.drop_orphans)
            await store.wait_connected()
            out = await _measure(pager, seconds)
            nursery.cancel_scope.cancel()
        if hasattr(store, "close"):
            store.close()
    finally:
        backing.close()
        os.unlink(backing_path)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(seconds: float = 1.0, capacity: str = "512M",
        transports: tuple[str, ...] = TRANSPORTS) -> dict[str, Any]:
    from hoststore.policy import Limits
    from vswapcommon.sizes import parse_size
    from vswapfs.hostclient import HostClient
    from vswapfs.inproc import InprocStore

    port = _free_port()
    report: dict[str, Any] = {"transports": {}}
    # Loopback TCP without a token, as a measurement of the transport (nothing here is worth stealing).
    with bench_store("vswapctl-microbench-", "--capacity", capacity, "--listen",
                     f"tcp:127.0.0.1:{port}", "--insecure-tcp") as (_, sock, workdir):
        makers: dict[str, Callable[[int], Any]] = {
            "inproc": lambda size: InprocStore("microbench", size,
                                               Limits(capacity_pages=parse_size(capacity) // PAGE_SIZE)),
            "unix+shared": lambda size: HostClient(Address("unix", path=sock), "microbench-shared", size),
            "unix": lambda size: HostClient(Address("unix", path=sock), "microbench-unix", size, share=False),
            "tcp": lambda size: HostClient(Address("tcp", host="127.0.0.1", port=port), "microbench-tcp", size,
                                           insecure_tcp=True),
        }
        for name in transports:
            report["transports"][name] = trio.run(_through, makers[name], os.path.join(workdir, "backing"),
                                                  seconds)
    report["checksum"] = {}
    for batch in BATCHES:
        cost = integrity_cost(batch)
        report["checksum"][str(batch)] = {"write_us_per_page": round(cost["write_us_per_page"], 3),
                                          "read_us_per_page": round(cost["read_us_per_page"], 3)}
    report["params"] = {"seconds_per_measurement": seconds, "store_capacity": capacity,
                        "transports": list(transports)}
    return report
