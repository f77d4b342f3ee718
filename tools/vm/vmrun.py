#!/usr/bin/env python3
"""On the host: run one throwaway VM, and never let it hang whoever runs it.

    vmrun.py LOG STALL TIMEOUT -- VNG_COMMAND...

Starts the guest with a QMP socket next to LOG, copies its console to LOG (and
its VMTEST lines to stdout: the rest is boot and kernel noise, in the log),
and watches the guest's heartbeat (``VMTEST-BEAT`` lines from
tools/vm/watch.py, locked in the guest's memory).  If no beat comes for STALL
seconds once the first has come, or beats come while nothing in swap moves for
STALL seconds (something being in it), or the whole run passes TIMEOUT
seconds, it sends the guest an NMI: the guest kernel (``unknown_nmi_panic``,
``panic_print``) prints every task's stack and the memory state.  A minute
later, or once the guest is gone, QEMU is killed.  Exit status: the guest's,
or 124 after a stall or timeout.

Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

DUMP_WAIT = 60.0  # for the guest to print what the NMI asked for
STALLED = 124


def qmp(path: str, command: str) -> None:
    """One QMP command (after the handshake)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        stream = sock.makefile("rwb")
        stream.readline()  # the greeting
        for cmd in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": cmd}).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "return" in reply or "error" in reply:
                    break


def run(log_path: str, stall: float, timeout: float, command: list[str]) -> int:
    qmp_path = log_path + ".qmp"
    command = command + [f"--qemu-opts=-qmp unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    assert proc.stdout is not None
    try:
        return _watch(proc, log_path, qmp_path, stall, timeout)
    finally:  # also on SIGTERM (from `timeout`) or ^C: the guest runs in a session of its own
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            os.unlink(qmp_path)
        except FileNotFoundError:
            pass


BEAT = re.compile(rb"VMTEST-BEAT .*?swap_used=(\d+)kB pswpout=(\d+) pswpin=(\d+)")


class SwapProgress:
    """When swap last moved, from the heartbeat's counters.  A guest whose heartbeat
    beats while nothing it has in swap moves is stalled all the same: a daemon spinning
    in reclaim (docs/pressure.md, cycle 4) let the heartbeat run for minutes while no
    swap request completed.  Nothing in swap (before the workload, after it) is not a
    stall."""

    def __init__(self) -> None:
        self._counters: tuple[int, int] | None = None
        self._since: float | None = None

    def beat(self, text: bytes, now: float) -> None:
        match = BEAT.search(text)
        if match is None:
            return
        used, out, into = map(int, match.groups())
        if not used:
            self._counters, self._since = None, None
        elif (out, into) != self._counters:
            self._counters, self._since = (out, into), now

    def still_for(self, now: float) -> float:
        """Seconds since swap last moved while something was in it (0: moving, or empty)."""
        return 0.0 if self._since is None else now - self._since


def _watch(proc: subprocess.Popen[bytes], log_path: str, qmp_path: str, stall: float, timeout: float) -> int:
    assert proc.stdout is not None
    start = time.monotonic()
    last_beat: float | None = None
    swap = SwapProgress()
    nmi_at: float | None = None
    line = b""
    with open(log_path, "wb") as log:
        def note(text: str) -> None:
            message = f"\nVMTEST-HOST: {text}\n".encode()
            log.write(message)
            sys.stdout.buffer.write(message)
            sys.stdout.flush()

        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                data = os.read(proc.stdout.fileno(), 1 << 16)
                if not data:
                    break
                log.write(data)
                log.flush()
                *lines, line = (line + data).split(b"\n")
                for text in lines:
                    if b"VMTEST-BEAT" in text:
                        last_beat = time.monotonic()
                        swap.beat(text, last_beat)
                    if b"VMTEST" in text:
                        sys.stdout.buffer.write(text.strip(b"\r") + b"\n")
                sys.stdout.flush()
                line = line[-4096:]
            now = time.monotonic()
            if nmi_at is None:
                why = None
                if last_beat is not None and now - last_beat > stall:
                    why = f"no heartbeat for {now - last_beat:.0f}s"
                elif swap.still_for(now) > stall:
                    why = f"nothing in swap moved for {swap.still_for(now):.0f}s"
                elif now - start > timeout:
                    why = f"still running after {timeout:.0f}s"
                if why:
                    note(f"{why}: sending an NMI for the guest's stacks")
                    try:
                        qmp(qmp_path, "inject-nmi")
                    except (OSError, ValueError) as exc:
                        note(f"could not send the NMI: {exc}")
                    nmi_at = now
            elif now - nmi_at > DUMP_WAIT:
                break
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        note(f"guest ended after {time.monotonic() - start:.0f}s" + (" (stopped: stall or timeout)" if nmi_at else ""))
    return STALLED if nmi_at is not None else proc.returncode


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    if len(argv) < 5 or argv[3] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    return run(argv[0], float(argv[1]), float(argv[2]), argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
