"""Faults injected into a live store, observed on the mounted file with O_DIRECT.

Never on live swap (docs/operations.md, "Things that bite"): a fault that loses pages there would hit
unrelated processes.  Each test asserts what happens to every page: read back
intact, or EIO for exactly the pages whose only copy was lost, at once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import msgpack
import pytest

from pagewire import protocol as p
from pagewire.messages import PAGE_SIZE, PROTOCOL_VERSION
from vswapctl import faults
from vswapctl.faults import pattern

from .conftest import fuse_unavailable
from .daemons import Daemons, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))]

NPAGES = 1024  # 4 MiB device
STORE_PAGES = 256  # 1 MiB store: the first 256 pages written land there


class Device(faults.Device):
    """O_DIRECT access to the mounted swap file (``vswapctl.faults.Device``): a read
    gives the page's bytes or None for EIO."""

    def write_run(self, first: int, n: int, version: int) -> float:
        return self.write(first, [version] * n)


@pytest.fixture
def make_daemons(disk_dir: str):
    made: list[Daemons] = []

    def make(**kw) -> tuple[Daemons, Device]:
        d = Daemons(disk_dir, capacity=f"{STORE_PAGES * 4}K", size=f"{NPAGES * 4}K", **kw)
        made.append(d)
        d.start()
        d.wait_host_connected()
        dev = Device(d.swapfile)
        devices.append(dev)
        return d, dev

    devices: list[Device] = []
    try:
        yield make
    finally:
        for dev in devices:
            dev.close()
        for d in made:
            d.stop()


def fill(dev: Device, pages: int, version: int = 1) -> None:
    for first in range(0, pages, 64):
        dev.write_run(first, min(64, pages - first), version)


def test_sigkill_in_write_back_loses_exactly_the_stores_pages_and_fails_them_at_once(make_daemons) -> None:
    d, dev = make_daemons()
    fill(dev, 512)
    before = d.stats()
    assert (before["pages_host"], before["pages_backing"]) == (STORE_PAGES, 512 - STORE_PAGES)
    d.signal_hoststore(signal.SIGKILL)
    d.hoststore.wait(10)
    d.start_hoststore()
    wait_for(lambda: d.stats()["link_sessions_lost"] == 1, 10, "vswapfs hearing its pages are gone")
    stats = d.stats()
    assert stats["pages_lost"] == STORE_PAGES and stats["pages_lost_now"] == STORE_PAGES
    slowest = 0.0
    for page in range(NPAGES):
        start = time.monotonic()
        got = dev.read(page)
        if page < STORE_PAGES:
            slowest = max(slowest, time.monotonic() - start)
            assert got is None, f"page {page}: the store's copy is gone, yet it read back"
        elif page < 512:
            assert got == pattern(page, 1), f"page {page} from the backing file"
        else:
            assert got == bytes(PAGE_SIZE)
    assert slowest < 1.0  # at once, not after --read-timeout (30 s)
    dev.write_run(7, 1, 2)  # rewriting a lost page makes it good again
    assert dev.read(7) == pattern(7, 2)
    assert d.stats()["lost_reads"] == STORE_PAGES and d.stats()["pages_lost_now"] == STORE_PAGES - 1


def test_sigkill_in_write_through_loses_nothing(make_daemons) -> None:
    d, dev = make_daemons(extra_vswapfs=["--writethrough"])
    fill(dev, 512)
    assert d.stats()["pages_host_and_backing"] == STORE_PAGES
    d.signal_hoststore(signal.SIGKILL)
    d.hoststore.wait(10)
    wait_for(lambda: not d.stats()["host_connected"], 10, "vswapfs noticing")
    for page in range(0, 512, 7):  # while the store is gone: from the backing file, at once
        assert dev.read(page) == pattern(page, 1)
    d.start_hoststore()
    d.wait_host_connected()
    for page in range(NPAGES):
        assert dev.read(page) == (pattern(page, 1) if page < 512 else bytes(PAGE_SIZE)), page
    assert d.stats()["pages_lost"] == 0 and d.stats()["io_errors"] == 0


def test_sigstop_writes_still_answered_in_time_and_reads_recover(make_daemons) -> None:
    # Reads over the wire: with shared memory they would not wait at all (the next test).
    d, dev = make_daemons(extra_vswapfs=["--write-timeout", "0.5", "--no-shared-memory"])
    fill(dev, 128)
    d.signal_hoststore(signal.SIGSTOP)
    try:
        latencies = [dev.write_run(200 + i * 8, 8, 2) for i in range(10)]
        assert max(latencies) < 2.0, latencies  # the write timeout, plus the backing write
        result: list[bytes | None] = []
        asked = d.stats()["read_requests"]
        reader = threading.Thread(target=lambda: result.append(dev.read(5)))
        reader.start()  # waits for the stopped store (up to --read-timeout)
        deadline = time.monotonic() + 10
        while d.stats()["read_requests"] == asked:  # the read reached vswapfs...
            assert time.monotonic() < deadline, "the read never reached vswapfs"
            time.sleep(0.01)
        assert not result  # ...and waits there
    finally:
        d.signal_hoststore(signal.SIGCONT)
    reader.join(20)
    assert result == [pattern(5, 1)]
    stats = d.stats()
    # Timed out, or (once a send was cut short and the link dropped) unreachable: never lost.
    assert stats["fallback_timeout"] >= 8 and stats["fallback_timeout"] + stats["fallback_unreachable"] == 80
    assert stats["read_failures"] == 0
    for i in range(10):
        assert dev.read(200 + i * 8) == pattern(200 + i * 8, 2)
    # The late puts reached the store after all; vswapfs had them dropped again.
    wait_for(lambda: d.host_stats()["pages_stored"] == d.stats()["pages_host"], 10, "late puts dropped")


def test_a_stopped_store_still_serves_reads_from_shared_memory(make_daemons) -> None:
    d, dev = make_daemons(extra_vswapfs=["--write-timeout", "0.5"])
    fill(dev, 128)
    before = d.stats()["shared_reads"]
    d.signal_hoststore(signal.SIGSTOP)
    try:
        start = time.monotonic()
        for page in range(128):
            assert dev.read(page) == pattern(page, 1)
        elapsed = time.monotonic() - start
    finally:
        d.signal_hoststore(signal.SIGCONT)
    stats = d.stats()
    assert stats["shared_reads"] - before == 128 and stats["read_failures"] == 0
    assert elapsed < 5.0  # no read waited for the stopped store (--read-timeout is 30 s)


def test_sigterm_drains_and_a_restarted_store_loses_nothing(make_daemons) -> None:
    d, dev = make_daemons()
    fill(dev, 512)
    d.signal_hoststore(signal.SIGTERM)
    assert d.hoststore.wait(30) == 0
    assert "drain complete" in d.read_log("hoststore")
    stats = d.stats()
    assert stats["handback_taken"] == STORE_PAGES and stats["pages_host"] == 0
    d.start_hoststore()
    d.wait_host_connected()
    for page in range(512):
        assert dev.read(page) == pattern(page, 1), page
    assert d.stats()["pages_lost"] == 0 and d.stats()["link_host_restarts"] == 1


def test_a_second_sigterm_exits_at_once_and_says_what_it_drops(make_daemons) -> None:
    d, dev = make_daemons()
    fill(dev, 64)
    d.vswapfs.send_signal(signal.SIGSTOP)  # the client cannot take anything back
    try:
        d.signal_hoststore(signal.SIGTERM)
        wait_for(lambda: "draining" in d.read_log("hoststore"), 10, "the drain starting")
        d.signal_hoststore(signal.SIGTERM)
        assert d.hoststore.wait(10) == 0
    finally:
        d.vswapfs.send_signal(signal.SIGCONT)
    log = d.read_log("hoststore")
    assert "DROPPING 64 pages" in log


def test_poison_and_garbage_leave_the_store_and_other_clients_intact(make_daemons) -> None:
    d, dev = make_daemons()
    fill(dev, 128)

    def raw(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(d.socket)
            s.recv(4096)  # the welcome
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def frame(obj) -> bytes:
        body = msgpack.packb(obj, use_bin_type=True)
        return p.HEADER.pack(len(body)) + body

    poison = {"version": PROTOCOL_VERSION, "client": "evil", "role": "pager", "device_size": 1 << 62,
              "instance": "x", "nonce": b"n" * 16}
    assert b"device" in raw(frame([p.REQUEST, 0, "hello", poison]))
    raw(b"\xff" * 4096)  # a 4 GiB length prefix
    raw(p.HEADER.pack(5) + b"\xc1" * 5)  # not msgpack
    raw(frame([p.REQUEST, 0, "put", [0, 1, b"x"]]))  # a page request before any hello
    assert d.hoststore.poll() is None
    host = d.host_stats()
    assert host["protocol_errors"] >= 3 and host["hello_refused"] >= 1 and "evil" not in host["clients"]
    for page in range(128):
        assert dev.read(page) == pattern(page, 1)
    assert d.stats()["link_connects"] == 1  # our connection was never touched


@pytest.mark.parametrize("lie", ["data", "seq"])
def test_a_store_answering_wrong_pages_gets_eio_never_wrong_data(make_daemons, lie: str) -> None:
    d, dev = make_daemons(hoststore_module="tests.liarstore", extra_hoststore=["--lie", lie])
    fill(dev, 64)
    assert d.stats()["pages_host"] == 64
    for page in range(64):
        got = dev.read(page)
        if page % 2:
            assert got is None, f"page {page}: the store lied, yet it read back"
        else:
            assert got == pattern(page, 1)
    stats = d.stats()
    assert stats["checksum_errors"] == 32
    # The honest pages came straight from shared memory; the lies there were caught too:
    # a damaged copy fails its checksum, a wrong version its header.
    assert stats["shared_memory"] and stats["shared_reads"] == 32
    assert stats["shared_retries"] == (32 if lie == "data" else 0)


def test_the_fault_tool_accounts_for_every_page(tmp_path) -> None:
    """`vswapctl faults` (tools/faults.sh) end to end, small: every fault once per mode."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vswapctl", "faults", "--rounds", "4", "--pages", "512",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["faults_injected"] == 8 and report["pages_verified"] == 8 * 512
    assert report["wrong_pages"] == 0 and report["all_losses_expected"]
    killed = [r for r in report["rounds"] if r["fault"] == "sigkill" and r["mode"] == "writeback"]
    assert killed[0]["pages_lost"] == killed[0]["expected_lost"] > 0  # the tool does see losses


def test_sighup_stops_neither_daemon(make_daemons) -> None:
    d, dev = make_daemons()
    fill(dev, 64)
    d.signal_hoststore(signal.SIGHUP)
    d.vswapfs.send_signal(signal.SIGHUP)
    time_limit = time.monotonic() + 1.0
    while time.monotonic() < time_limit:  # a dying daemon would be gone within this second
        assert d.hoststore.poll() is None and d.vswapfs.poll() is None
        time.sleep(0.05)
    for page in range(64):
        assert dev.read(page) == pattern(page, 1)


def test_vswapctl_drain_hands_everything_back_and_reports(make_daemons) -> None:
    import json
    import subprocess
    import sys

    d, dev = make_daemons()
    fill(dev, 512)
    done = subprocess.run([sys.executable, "-m", "vswapctl", "drain", "--host", f"unix:{d.socket}", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"): done.stdout.rindex("}") + 1])
    assert sum(report["handed_back"].values()) == STORE_PAGES and report["dropped"] == {}
    assert d.hoststore.wait(30) == 0
    for page in range(512):
        assert dev.read(page) == pattern(page, 1)
    assert d.stats()["pages_host"] == 0 and d.stats()["handback_taken"] == STORE_PAGES
