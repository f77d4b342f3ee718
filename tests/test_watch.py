"""top, record and plot, against a store process (no swap needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from pagewire.address import Address
from pagewire.messages import PAGE_SIZE
from vswapctl import watch
from vswapctl.benchstore import bench_store


def vswapctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapctl", *args], capture_output=True, text=True, timeout=60)


def put_pages(sock: str, n: int) -> None:
    async def go() -> None:
        from vswapfs.hostclient import HostClient

        client = HostClient(Address("unix", path=sock), "vm1", 64 * PAGE_SIZE)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.wait_connected()
            await client.put(0, 1, os.urandom(n * PAGE_SIZE))
            await client.invalidate(0, 64, 2)  # nothing left behind for the store's stop
            nursery.cancel_scope.cancel()

    trio.run(go)


def test_rates_and_a_screen_from_fake_samples() -> None:
    a = {"time": 100.0, "vswapfs.device_pages": 10, "vswapfs.host_writes": 10, "vswapfs.pages_host": 5,
         "store.pages_stored": 5, "store.capacity_pages": 16, "store.refused_pressure": 0}
    b = dict(a, time=102.0, **{"vswapfs.host_writes": 30, "store.refused_pressure": 8})
    per = watch.rates(a, b)
    assert per["vswapfs.host_writes"] == 10 and watch.refusal_rates(per) == {"pressure": 4}
    screen = watch.render(b, per, "test")
    assert "pages out to store" in screen and "10/s" in screen and "pressure 4" in screen


def test_record_then_plot_a_store(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    with bench_store("vswapctl-watchtest-", "--capacity", "16M") as (_, sock, _dir):
        path = str(tmp_path / "run.jsonl")
        recorder = subprocess.Popen([sys.executable, "-m", "vswapctl", "record", path, "--host", f"unix:{sock}",
                                     "--interval", "0.2", "--count", "8"], stdout=subprocess.PIPE, text=True)
        put_pages(sock, 12)
        assert recorder.wait(60) == 0
        csv_done = vswapctl("record", str(tmp_path / "run.csv"), "--host", f"unix:{sock}", "--interval", "0.1",
                            "--count", "3")
        assert csv_done.returncode == 0, csv_done.stderr
        top = vswapctl("top", "--host", f"unix:{sock}", "--interval", "0.1", "--count", "2")
        assert top.returncode == 0 and "pages stored of 4096" in top.stdout, top.stdout + top.stderr
    samples = [json.loads(line) for line in open(path)]
    assert len(samples) == 8 and max(s["store.accepted"] for s in samples) == 12
    assert len(watch.read_recording(str(tmp_path / "run.csv"))) == 3
    done = vswapctl("plot", path, "-o", str(tmp_path / "run.png"))
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "run.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_top_without_a_device_or_a_store_says_why(tmp_path) -> None:
    done = vswapctl("--state-dir", str(tmp_path), "top", "--count", "1")
    assert done.returncode == 1 and "no device or cache is up" in done.stderr
