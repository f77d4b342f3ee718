"""``vswapctl membench``: what the pages cost in memory, in each daemon.

A pager process (the class vswapfs runs, on a backing file of the device
size) stores pages in a hoststore process through the transport vswapfs
uses by default (a unix socket with shared memory), reads them all back,
then releases them.  Measured from /proc, in the two processes we started
(nothing machine-wide):

* the store: what a client costs it once connected, before any page (a
  shared client's staging area, kept resident: pagewire.sharedmem says
  why); then its resident memory growth per byte of page data stored (index,
  bookkeeping and slab together; pages in shared memory count where the store
  touched them), and how much of it goes back once the pages leave;
* the pager: its resident memory for the device, not counting the store's
  shared pages it has mapped (RssShmem: the store's memory, seen twice).

Pages are written in 32-page runs, either packed (swap's clusters) or spread
one run every ``stride`` pages over the whole device (the index's worst case).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from pagewire.messages import PAGE_SIZE

from . import launch
from .benchstore import bench_store

RUN = 32


def rss(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _pager_main(socket_path: str, backing_path: str, device_size: int, pages: int, stride: int,
                shared: bool) -> None:
    """In a fresh process: store ``pages`` pages, read them back, report, release."""
    import trio

    from pagewire.address import Address
    from vswapfs.backing import Backing
    from vswapfs.hostclient import HostClient
    from vswapfs.pager import Pager

    async def go() -> dict[str, Any]:
        backing = Backing.open(backing_path, device_size)
        client = HostClient(Address("unix", path=socket_path), "membench", device_size, share=shared)
        pager = Pager(backing, client, write_timeout=30.0)
        report: dict[str, Any] = {"pager_rss_start": rss()}
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(pager.drop_orphans)
            await client.wait_connected()
            print(json.dumps({"connected": True}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the parent measures the store now
            chunk = os.urandom(RUN * PAGE_SIZE)
            firsts = [(i * stride) % (device_size // PAGE_SIZE - RUN) for i in range(pages // RUN)]
            for first in firsts:
                await pager.write(first * PAGE_SIZE, chunk)
            for first in firsts:
                if await pager.read(first * PAGE_SIZE, RUN * PAGE_SIZE) != chunk:
                    raise SystemExit(f"page run {first} read back wrong")
            stats = pager.stats()
            report["pages_host"] = stats["pages_host"]
            report["shared_reads"] = stats["shared_reads"]
            report["pager_rss_full"] = rss()
            print(json.dumps(report), flush=True)
            sys.stdin.readline()  # the parent measures the store now
            await pager.release_all()
            nursery.cancel_scope.cancel()
        backing.close()

    trio.run(go)


def measure(device_size: int, pages: int, stride: int, shared: bool = True) -> dict[str, Any]:
    with bench_store("vswapctl-membench-", "--capacity", str(pages * PAGE_SIZE)) as (store, sock, workdir):
        time.sleep(0.2)
        store_before = rss(store.pid)
        child = launch.popen("vswapctl.membench", sock, os.path.join(workdir, "backing"), str(device_size),
                             str(pages), str(stride), "shared" if shared else "wire",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None

            def next_report() -> dict[str, Any]:
                line = child.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError("the pager process failed")
                return json.loads(line)

            next_report()  # connected
            store_connected = rss(store.pid)
            child.stdin.write("\n")
            child.stdin.flush()
            report = next_report()
            store_full = rss(store.pid)
            child.stdin.write("\n")
            child.stdin.flush()
            child.wait(120)
            time.sleep(0.3)
            store_after = rss(store.pid)
        finally:
            if child.poll() is None:
                child.kill()
    stored = report["pages_host"] * PAGE_SIZE
    pager = report["pager_rss_full"]
    return {
        "device_size": device_size, "pages_stored": report["pages_host"], "stride": stride, "shared": shared,
        "store_bytes_per_byte_stored": round((store_full["VmRSS"] - store_connected["VmRSS"]) / stored, 4),
        "store_per_client": store_connected["VmRSS"] - store_before["VmRSS"],
        "store_rss_before": store_before["VmRSS"], "store_rss_full": store_full["VmRSS"],
        "store_rss_after_release": store_after["VmRSS"],
        "store_given_back": round((store_full["VmRSS"] - store_after["VmRSS"])
                                  / max(1, store_full["VmRSS"] - store_connected["VmRSS"]), 3),
        "pager_rss": pager["VmRSS"], "pager_rss_shared_pages": pager.get("RssShmem", 0),
        "pager_rss_own": pager["VmRSS"] - pager.get("RssShmem", 0),
        "pager_rss_start": report["pager_rss_start"]["VmRSS"],
        "shared_reads": report["shared_reads"],
    }


def run(device_size: int, pages: int) -> dict[str, Any]:
    npages = device_size // PAGE_SIZE
    spread = max(RUN, npages // max(1, pages // RUN))
    return {"packed": measure(device_size, pages, RUN), "spread": measure(device_size, pages, spread),
            "packed_no_shared_memory": measure(device_size, pages, RUN, shared=False)}


if __name__ == "__main__":  # the pager process of measure()
    _pager_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                sys.argv[6] == "shared")
