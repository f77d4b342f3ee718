"""Live swap, as root: vswapctl up, a verifying workload in a memory cgroup, vswapctl down.

Teardown always runs (``vswapctl down`` in a finally), in the safe order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vswapctl import system
from vswapctl.state import State

from .conftest import swap_unavailable

pytestmark = [pytest.mark.swap, pytest.mark.skipif(swap_unavailable() is not None, reason=str(swap_unavailable()))]


def vswapctl(state_dir: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, *args],
                          capture_output=True, text=True, timeout=timeout)


STARTED: list[State] = []


def our_cgroups() -> list[str]:
    from vswapctl import cgroup

    found = []
    for root in (cgroup.V1_ROOT, *cgroup.V2_ROOTS):
        if os.path.isdir(root):
            found += [name for name in os.listdir(root) if name.startswith("vswapctl-")]
    return found


@pytest.fixture
def state_dir(disk_dir: str):
    """A state directory; afterwards (pass or fail) the device is down and nothing is
    left behind: no swap, loop device, mount, memory cgroup or daemon of ours."""
    path = os.path.join(disk_dir, "state")
    swaps_before = set(system.swaps())
    STARTED.clear()
    try:
        yield path
    finally:
        if State.load(path) is not None:
            vswapctl(path, "down", timeout=1800)
        assert State.load(path) is None
        assert set(system.swaps()) == swaps_before
        assert system.loops_under(disk_dir) == []
        with open("/proc/mounts") as f:
            assert not [line for line in f if line.split()[1].startswith(disk_dir)]
        assert our_cgroups() == []
        for state in STARTED:
            for ident in (state.hoststore_id, state.vswapfs_id):
                assert ident is None or not ident.alive(), f"{ident} is still running"


def up(state_dir: str, disk_dir: str, *extra: str, capacity: str = "64M") -> None:
    done = vswapctl(state_dir, "up", "--size", "512M", "--capacity", capacity,
                    "--backing", os.path.join(disk_dir, "backing"), *extra)
    state = State.load(state_dir)
    if state is not None:
        STARTED.append(state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert state is not None and state.loop in system.swaps()
    assert system.loop_dio(state.loop)


def stats(state_dir: str) -> dict:
    done = vswapctl(state_dir, "stats", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_workload_through_host_and_backing_has_no_bad_pages(state_dir: str, disk_dir: str) -> None:
    up(state_dir, disk_dir, "--priority", "32000")
    before = stats(state_dir)
    done = vswapctl(state_dir, "workload", "--size", "256M", "--limit", "64M")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pages"] == 65536 and result["bad_pages"] == 0
    after = stats(state_dir)
    fs, host = after["vswapfs"], after["hoststore"]
    # The workload's 256M cannot fit in the 64M store: both tiers must have been used.
    assert fs["host_writes"] - before["vswapfs"]["host_writes"] > 0
    assert fs["backing_writes"] - before["vswapfs"]["backing_writes"] > 0
    assert fs["host_reads"] > 0 and fs["backing_reads"] > 0
    assert_store_took_what_was_sent(fs, host)
    assert host["refused_capacity"] > 0
    assert fs["io_errors"] == 0 and fs["read_failures"] == 0
    status = vswapctl(state_dir, "status")
    assert status.returncode == 0 and "host" in status.stdout and "backing" in status.stdout


def assert_store_took_what_was_sent(fs: dict, store: dict) -> None:
    """The store accepted every page vswapfs counts as written to it, and beyond those at
    most the pages of puts whose answer came too late or never (on a loaded machine): those
    went to the backing file, though the store may have taken them too."""
    unanswered = sum(fs[k] for k in ("fallback_timeout", "fallback_unreachable", "fallback_error"))
    assert fs["host_writes"] <= store["accepted"] <= fs["host_writes"] + unanswered


def test_workload_through_the_in_process_store_and_backing(state_dir: str, disk_dir: str) -> None:
    """--host inproc: no store daemon; vswapfs keeps up to --capacity in its own memory."""
    up(state_dir, disk_dir, "--host", "inproc", "--priority", "32000")
    state = State.load(state_dir)
    assert state is not None and state.hoststore_id is None and state.host == "inproc"
    done = vswapctl(state_dir, "workload", "--size", "256M", "--limit", "64M")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pages"] == 65536 and result["bad_pages"] == 0
    after = stats(state_dir)
    fs, store = after["vswapfs"], after["hoststore"]
    assert fs["host_address"] == "inproc" and "inproc_store" not in fs
    assert store["accepted"] == fs["host_writes"] > 0 and store["refused_capacity"] > 0
    assert fs["backing_writes"] > 0 and fs["host_reads"] > 0 and fs["backing_reads"] > 0
    assert fs["io_errors"] == 0 and fs["read_failures"] == 0
    status = vswapctl(state_dir, "status")
    assert status.returncode == 0 and "inproc (in vswapfs)" in status.stdout
    drain = vswapctl(state_dir, "drain")
    assert drain.returncode == 1 and "no store daemon" in drain.stderr


def test_workload_through_a_store_on_loopback_tcp_without_a_token(state_dir: str, disk_dir: str) -> None:
    """`up --host tcp:... --insecure-tcp` passes the flag on to vswapfs, and stats (from the
    state directory) reach the store the same way; without the flag, up refuses at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"tcp:127.0.0.1:{port}"

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0
    refused = vswapctl(state_dir, "up", "--size", "512M", "--host", host)
    assert refused.returncode == 1 and "--insecure-tcp" in refused.stderr and State.load(state_dir) is None
    store = subprocess.Popen([sys.executable, "-m", "hoststore", "--listen", host, "--insecure-tcp",
                              "--capacity", "64M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(listening, 15, "the store listening")
        up(state_dir, disk_dir, "--host", host, "--insecure-tcp", "--priority", "32000")
        state = State.load(state_dir)
        assert state is not None and state.insecure_tcp and state.hoststore_id is None
        done = vswapctl(state_dir, "workload", "--size", "256M", "--limit", "64M")
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["bad_pages"] == 0
        after = stats(state_dir)
        fs, host_stats = after["vswapfs"], after["hoststore"]
        assert fs["host_address"] == host and not fs["shared_memory"]
        assert_store_took_what_was_sent(fs, host_stats)
        assert fs["host_writes"] > 0 and fs["host_reads"] > 0
        assert fs["io_errors"] == 0 and fs["read_failures"] == 0 and fs["checksum_errors"] == 0
    finally:
        vswapctl(state_dir, "down", timeout=1800)  # swap off first; then the store may go
        store.send_signal(signal.SIGTERM)
        store.wait(120)


def start_workload(state_dir: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "workload",
                             "--size", "256M", "--limit", "64M", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_workload(work: subprocess.Popen[str]) -> dict:
    out, err = work.communicate(timeout=600)
    assert work.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pages"] == 65536 and result["bad_pages"] == 0
    return result


def wait_until(predicate, timeout: float, what: str, work: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert work is None or work.poll() is None, f"the workload ended before {what}"
        time.sleep(0.05)


def test_store_restarted_with_sigterm_mid_workload_loses_nothing(state_dir: str, disk_dir: str) -> None:
    """A planned restart of the store under live swap: it drains (hands every page
    back to vswapfs, which writes them to the backing file), a new one starts, and
    the verifying workload sees every page intact."""
    up(state_dir, disk_dir, "--priority", "32000")
    state = State.load(state_dir)
    work = start_workload(state_dir)
    new_store = None
    try:
        wait_until(lambda: stats(state_dir)["hoststore"]["pages_stored"] > 4096, 120, "pages in the store", work)
        assert state.hoststore_id.signal(signal.SIGTERM)
        assert state.hoststore_id.wait_gone(60), "the store did not finish draining"
        new_store = subprocess.Popen([sys.executable, "-m", "hoststore", "--listen", f"unix:{state.socket}",
                                      "--capacity", "64M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finish_workload(work)
        fs = stats(state_dir)["vswapfs"]
        assert fs["handback_taken"] > 4096 and fs["pages_lost"] == 0
        assert fs["io_errors"] == 0 and fs["read_failures"] == 0 and fs["checksum_errors"] == 0
        assert fs["link_host_restarts"] == 1
    finally:
        if work.poll() is None:
            work.kill()
            work.wait()
        if new_store is not None:
            vswapctl(state_dir, "down", timeout=1800)  # swap off first; then the store may go
            new_store.send_signal(signal.SIGTERM)
            new_store.wait(60)


def pressure_mid_workload(state_dir: str, pressure: str, stored: int, what: str, *extra: str) -> None:
    """A workload that runs until the store holds ``stored`` pages, then under pressure until
    the store has handed 2048 back, then without: it ends with no bad page."""
    work = start_workload(state_dir, *extra)
    try:
        wait_until(lambda: stats(state_dir)["hoststore"]["pages_stored"] > stored, 120, what, work)
        with open(pressure, "w") as f:
            f.write("95")  # above the high watermark: hand back, refuse
        wait_until(lambda: stats(state_dir)["hoststore"]["handed_back_pressure"] > 2048, 60, "a hand-back", work)
        with open(pressure, "w") as f:
            f.write("50")  # below the low watermark: stop
        finish_workload(work)
    finally:
        if work.poll() is None:
            work.kill()
            work.wait()


def test_pressure_hands_pages_back_mid_workload(state_dir: str, disk_dir: str) -> None:
    """Memory pressure (steered through a pressure file) makes the store hand its
    least recently used pages back while live swap goes on: 0 bad pages."""
    pressure = os.path.join(disk_dir, "pressure")
    with open(pressure, "w") as f:
        f.write("10")
    up(state_dir, disk_dir, "--priority", "32000", "--pressure-source", f"file:{pressure}", capacity="512M")
    pressure_mid_workload(state_dir, pressure, 8192, "pages in the store")
    s = stats(state_dir)
    fs, host = s["vswapfs"], s["hoststore"]
    assert host["handed_back_pressure"] > 2048 and host["refused_pressure"] > 0
    assert 0 < host["handed_back_pressure"] <= fs["handback_taken"] + fs["handback_not_needed"]
    assert host["clients"]  # an admin's view names the clients
    assert fs["pages_lost"] == 0 and fs["io_errors"] == 0 and fs["checksum_errors"] == 0


def test_compressed_store_takes_json_pages_and_hands_them_back_under_pressure(state_dir: str,
                                                                               disk_dir: str) -> None:
    """hoststore --compress zstd under live swap of application-like data: the store holds
    more than its capacity in pages, hands compressed pages back as pages under pressure,
    and nothing read back is wrong."""
    pressure = os.path.join(disk_dir, "pressure")
    with open(pressure, "w") as f:
        f.write("10")
    up(state_dir, disk_dir, "--priority", "32000", "--compress", "zstd", "--pressure-source", f"file:{pressure}",
       capacity="48M")
    pressure_mid_workload(state_dir, pressure, 14000, "more pages in the store than 48M holds uncompressed (12288)",
                          "--data", "json")
    s = stats(state_dir)
    fs, host = s["vswapfs"], s["hoststore"]
    comp = host["compression"]
    assert comp["algorithm"] == "zstd" and host["fullest"]["data_bytes"] > 64 << 20
    assert host["fullest"]["data_bytes"] > 1.5 * host["fullest"]["mem_bytes"]
    assert host["decode_errors"] == 0 and host["handed_back_pressure"] > 2048
    assert fs["pages_lost"] == 0 and fs["io_errors"] == 0 and fs["checksum_errors"] == 0
    status = vswapctl(state_dir, "status")
    [line] = [line for line in status.stdout.splitlines() if line.startswith("compression ")]
    assert status.returncode == 0 and line.split()[1] == "zstd:" and "of memory" in line


def test_workload_through_a_compressing_in_process_store(state_dir: str, disk_dir: str) -> None:
    up(state_dir, disk_dir, "--host", "inproc", "--compress", "lz4", "--priority", "32000")
    done = vswapctl(state_dir, "workload", "--size", "256M", "--limit", "64M", "--data", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pages"] == 65536 and result["bad_pages"] == 0
    s = stats(state_dir)
    fs, store = s["vswapfs"], s["hoststore"]
    assert store["compression"]["algorithm"] == "lz4" and store["fullest"]["data_bytes"] > 64 << 20
    assert store["accepted"] > 16384 and store["decode_errors"] == 0
    assert fs["io_errors"] == 0 and fs["read_failures"] == 0 and fs["checksum_errors"] == 0


def test_down_cleans_up_after_vswapfs_died(state_dir: str, disk_dir: str) -> None:
    up(state_dir, disk_dir)
    state = State.load(state_dir)
    # Take swap off first: killing vswapfs under live swap would take other processes' pages.
    system.run(["swapoff", state.loop])
    assert state.vswapfs_id.signal(signal.SIGKILL)
    assert state.vswapfs_id.wait_gone(10)
    done = vswapctl(state_dir, "down")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"detached {state.loop}" in done.stdout
    assert "lazily unmounted" in done.stdout and "had died" in done.stdout
    assert "hoststore" in done.stdout
    assert system.loops_for(state.swapfile) == [] and system.mount_type(state.mountpoint) is None
    assert not state.hoststore_id.alive()


def test_store_gives_pages_back_after_the_workload_exits(state_dir: str, disk_dir: str) -> None:
    """With discard on (the default), freed swap slots leave the store: once the
    workload has exited, the store holds no more than the device still uses."""
    import time

    up(state_dir, disk_dir)
    state = State.load(state_dir)
    assert "--discard=pages" in state.swapon_options
    done = vswapctl(state_dir, "workload", "--size", "256M", "--limit", "64M")
    assert done.returncode == 0, done.stdout + done.stderr
    margin = 1024  # pages (4 MiB): slots freed but not yet discarded in a partly used cluster
    deadline = time.monotonic() + 60
    while True:
        used_pages = system.swaps()[state.loop]["used_kib"] // 4
        s = stats(state_dir)
        fs, host = s["vswapfs"], s["hoststore"]
        held = fs["pages_host"] + fs["pages_backing"]
        # The kernel discards a freed slot once its whole cluster (256 slots) is free: each
        # slot still in use may keep up to 255 freed neighbours in the map (seen: 1541 held
        # for 99 used).  Without discards reaching the map it would hold the whole workload.
        if host["pages_stored"] <= used_pages + margin and held <= 256 * used_pages + margin:
            break
        assert time.monotonic() < deadline, (
            f"store holds {host['pages_stored']} pages, device map {held}, swap used {used_pages} pages"
        )
        time.sleep(0.5)
    assert host["pages_stored"] == fs["pages_host"]
    assert fs["discard_requests"] > 0 and fs["discard_pages"] > 0
    # The 64M store was full during the workload; nearly all of it came back.
    assert fs["discard_host_pages"] >= 16384 - margin
    assert host["invalidated"] >= fs["discard_host_pages"]


def test_bench_reports_medians_and_ratios(tmp_path) -> None:
    """A small bench run: the report's shape and sanity, not its speed."""
    swaps_before = set(system.swaps())
    targets = ("loop", "inproc", "hoststore-small")
    done = subprocess.run([sys.executable, "-m", "vswapctl", "bench", "--runs", "3", "--size", "48M",
                           "--limit", "16M", "--device-size", "128M", "--small-capacity", "16M",
                           "--targets", ",".join(targets), "--json"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)  # nothing but the report on stdout
    for target in targets:
        assert report["medians"][target]["runs"] == 3
        assert all(report["medians"][target][phase] > 0 for phase in ("fill", "verify_seq", "verify_random"))
    assert set(report["ratios"]) == {"vs_inproc"}
    assert set(report["ratios"]["vs_inproc"]["loop"]) == {"fill", "verify_seq", "verify_random"}
    assert report["medians"]["hoststore-small"]["pages_to_backing"] > 0
    assert report["medians"]["inproc"]["pages_to_store"] > 0
    assert set(system.swaps()) == swaps_before  # it left the machine as it found it
    assert our_cgroups() == []


def test_down_stops_at_a_failed_swapoff_and_leaves_everything_running(state_dir: str, disk_dir: str,
                                                                      tmp_path) -> None:
    """swapoff fails (ENOMEM, when RAM cannot take the pages back; here a failing swapoff
    first on PATH): down stops right there, says why and what to do, exits non-zero."""
    up(state_dir, disk_dir)
    state = State.load(state_dir)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "swapoff").write_text("#!/bin/sh\necho \"swapoff: $1: swapoff failed: Cannot allocate memory\" >&2\n"
                                  "exit 255\n")
    (fake / "swapoff").chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "vswapctl", "--state-dir", state_dir, "down"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert done.returncode == 1
    assert "Cannot allocate memory" in done.stdout and "Nothing more was stopped, unmounted or detached" in done.stdout
    assert "free memory" in done.stdout and "down stopped" in done.stderr
    assert state.loop in system.swaps() and system.loops_for(state.swapfile) == [state.loop]
    assert system.mount_type(state.mountpoint) == "fuse.vswapfs"
    assert state.vswapfs_id.alive() and state.hoststore_id.alive()
    assert State.load(state_dir) is not None
    assert stats(state_dir)["vswapfs"]["host_connected"]  # still serving
    done = vswapctl(state_dir, "down")  # the real swapoff: down goes all the way
    assert done.returncode == 0, done.stdout + done.stderr
