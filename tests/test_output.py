"""A daemon's output never waits for its log file (vswapcommon.logsetup.Output)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import logging, os, sys, time
    from vswapcommon.logsetup import OUTPUT, setup_logging
    setup_logging(False, "child")
    OUTPUT.start()
    log = logging.getLogger("child")
    start = time.monotonic()
    for i in range(20000):
        log.info("line %d %s", i, "x" * 200)
        print("printed", i)
    try:
        os.write(2, b"from C-level code\\n")  # as C code would: EAGAIN, not a wait, once the pipe is full
    except BlockingIOError:
        pass
    sys.stdout.flush()
    os.write(int(sys.argv[1]), f"{time.monotonic() - start:.3f} {OUTPUT.dropped}\\n".encode())
""")


def test_a_daemon_goes_on_while_its_log_file_does_not_take_a_byte() -> None:
    """The log 'file' is a pipe nobody reads (as a tmpfs page waiting for its swap-in
    would be): 4 MiB of lines go out in well under the time a blocked write would take
    (forever), and what did not fit is counted."""
    stuck_r, stuck_w = os.pipe()  # never read: writes to it block once it is full
    report_r, report_w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(report_w)], stdout=stuck_w, stderr=stuck_w,
                             pass_fds=(report_w,), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.close(report_w)
    try:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.returncode == 0, "the child blocked on its output (or failed)"
        seconds, dropped = os.read(report_r, 100).decode().split()
        assert int(dropped) > 10000  # most of 40,000 writes found the pipe full
    finally:
        if child.poll() is None:
            child.kill()
        for fd in (stuck_r, stuck_w, report_r):
            os.close(fd)


def test_what_fits_reaches_the_log_file(tmp_path) -> None:
    path = tmp_path / "log"
    with open(path, "wb") as f:
        done = subprocess.run([sys.executable, "-c", CHILD.replace("range(20000)", "range(3)"), "1"],
                              stdout=f, stderr=f, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              timeout=60)
    assert done.returncode == 0
    text = path.read_text()
    assert "child[" in text and "INFO line 2" in text and "printed 2" in text and "from C-level code" in text


def test_a_chunk_the_log_file_refuses_is_counted_and_the_copier_goes_on(tmp_path, monkeypatch) -> None:
    """One failed write (a full disk) must not end the daemon's log for good."""
    import threading
    import types

    from vswapcommon import logsetup

    failures = []

    def write(fd: int, data) -> int:
        if fd == target and not failures:
            failures.append(bytes(data))
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    monkeypatch.setattr(logsetup, "os", types.SimpleNamespace(read=os.read, write=write))
    output = logsetup.Output()
    read_end, write_end = os.pipe()
    target = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(write_end, b"lost\n")
    copier = threading.Thread(target=logsetup._copy, args=(read_end, target, output, 0.0))
    copier.start()
    deadline = time.monotonic() + 10
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the copier's first write, with a deadline
    os.write(write_end, b"kept\n")
    os.close(write_end)
    copier.join(10)
    os.close(read_end)
    os.close(target)
    assert not copier.is_alive() and failures == [b"lost\n"] and output.dropped == 1
    assert (tmp_path / "log").read_bytes() == b"kept\n"
