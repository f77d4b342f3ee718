"""Prometheus metrics: names and values as a scraper sees them, from both daemons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hoststore.storemetrics import store_families
from vswapcommon import metrics
from pagewire.messages import PAGE_SIZE

from .daemons import Daemons
from .conftest import fuse_unavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 10) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            if samples:
                return samples
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no metrics on port {port}")
        time.sleep(0.2)


@pytest.mark.parametrize("text, expected", [("9100", ("127.0.0.1", 9100)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
                                            ("[::1]:9100", ("::1", 9100))])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["x", "1:99999", "host:"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        metrics.parse_metrics_address(text)


def test_store_counters_become_prometheus_families() -> None:
    stats = {"accepted": 5, "refused_pressure": 2, "refused_capacity": 1, "refused_auth": 3, "put_requests": 4,
             "pages_stored": 5, "bytes_stored": 5 * PAGE_SIZE, "capacity_pages": 16, "used_percent": 42.0,
             "under_pressure": True, "instance": "abc",
             "clients": {"vm1": {"pages": 5, "accepted": 5, "refused_pressure": 2}}}
    names = {}
    for family in store_families(stats):
        for sample in family.samples:
            names[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert names[("vswap_store_accepted_pages_total", ())] == 5
    assert names[("vswap_store_refused_pages_total", (("reason", "pressure"),))] == 2
    assert names[("vswap_store_refused_auth_connections_total", ())] == 3
    assert names[("vswap_store_put_requests_total", ())] == 4
    assert names[("vswap_store_capacity_bytes", ())] == 16 * PAGE_SIZE
    assert names[("vswap_host_memory_used_ratio", ())] == pytest.approx(0.42)
    assert names[("vswap_store_under_pressure", ())] == 1
    assert names[("vswap_store_client_pages", (("client", "vm1"),))] == 5
    assert names[("vswap_store_client_refused_pages_total", (("client", "vm1"), ("reason", "pressure")))] == 2


def test_a_running_store_serves_its_counters_and_a_busy_port_is_an_error(tmp_path) -> None:
    from vswapctl.benchstore import bench_store

    port = free_port()
    with bench_store("vswapctl-metricstest-", "--capacity", "16M", "--metrics", str(port)) as (proc, sock, _dir):
        from pagewire.address import Address
        from vswapfs.hostclient import HostClient

        async def put_some() -> None:
            client = HostClient(Address("unix", path=sock), "vm1", 64 * PAGE_SIZE)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await client.wait_connected()
                await client.put(0, 1, os.urandom(8 * PAGE_SIZE))
                nursery.cancel_scope.cancel()

        trio.run(put_some)
        deadline = time.monotonic() + 10
        while scrape(port).get(("vswap_store_accepted_pages_total", ())) != 8:
            assert time.monotonic() < deadline, "the scrape never showed the 8 pages"
            time.sleep(0.3)
        samples = scrape(port)
        assert samples[("vswap_store_client_pages", (("client", "vm1"),))] == 8
        busy = subprocess.run([sys.executable, "-m", "hoststore", "--listen", f"unix:{tmp_path}/s.sock",
                               "--metrics", str(port)], capture_output=True, text=True, timeout=30)
        assert busy.returncode != 0 and f"--metrics 127.0.0.1:{port}" in busy.stderr
        assert "Traceback" not in busy.stderr, busy.stderr
        assert busy.stderr.strip().splitlines()[-1] == f"hoststore: error: --metrics 127.0.0.1:{port}: Address already in use"
        # The 8 pages belong to a client that is gone: a drain would wait for it; no swap
        # is on this store, so the second SIGTERM (exit at once) loses nothing of anyone's.
        proc.send_signal(15)
        from pagewire.messages import Stats
        from vswapfs.hostclient import query

        deadline = time.monotonic() + 10
        while not trio.run(query, Address("unix", path=sock), Stats()).get("draining"):  # the first one is in
            assert time.monotonic() < deadline, "the store never began its drain"
            time.sleep(0.05)
        proc.send_signal(15)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
def test_a_scrape_of_vswapfs_during_a_run(disk_dir: str) -> None:
    port = free_port()
    d = Daemons(disk_dir, capacity="1M", size="16M", extra_vswapfs=["--metrics", f"127.0.0.1:{port}"])
    d.start()
    try:
        d.wait_host_connected()
        fd = os.open(d.swapfile, os.O_RDWR | os.O_DIRECT)
        import mmap

        buf = mmap.mmap(-1, 64 * PAGE_SIZE)
        buf[:] = os.urandom(64 * PAGE_SIZE)
        try:
            for first in range(0, 512, 64):  # 2M through a 1M store: both tiers
                os.pwrite(fd, buf, first * PAGE_SIZE)
        finally:
            os.close(fd)
        deadline = time.monotonic() + 10
        while True:
            samples = scrape(port)
            stats = d.stats()
            if samples.get(("vswap_pager_host_writes_pages_total", ())) == stats["host_writes"]:
                break
            assert time.monotonic() < deadline, "metrics never caught up with the counters"
            time.sleep(0.3)
        assert samples[("vswap_pager_backing_writes_pages_total", ())] == stats["backing_writes"] > 0
        assert samples[("vswap_pager_pages", (("state", "host"),))] == stats["pages_host"]
        assert samples[("vswap_pager_refused_pages_total", (("reason", "capacity"),))] == stats["refused_capacity"]
        assert samples[("vswap_pager_store_connected", ())] == 1
    finally:
        d.stop()


def test_a_store_that_cannot_listen_says_so_in_one_line(tmp_path) -> None:
    """The port is taken: one line naming the problem, no traceback, exit status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "hoststore", "--listen", f"tcp:127.0.0.1:{port}",
                               "--insecure-tcp"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "hoststore: error: cannot listen: Address already in use"
