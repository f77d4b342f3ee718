"""Daemons known by more than their pid.

A pid saved in a state file may belong to another process by the time
``vswapctl down`` runs (the daemon died, the pid was reused, the machine
rebooted).  A daemon is therefore recorded as its pid, its start time
(``/proc/PID/stat`` field 22, clock ticks since boot) and the boot it belongs
to (``/proc/sys/kernel/random/boot_id``), and every signal goes through a pidfd
opened and then checked against those: the signal reaches exactly the process
``up`` started, or nobody.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and parentheses


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far, all its threads; None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / TICKS  # proc(5): fields 14, 15


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of the whole line


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int
    boot: str = ""

    @classmethod
    def of(cls, pid: int) -> "ProcessId | None":
        start = start_time(pid)
        return None if start is None else cls(pid, start, boot_id())

    @classmethod
    def from_dict(cls, data: object) -> "ProcessId | None":
        if isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("start"), int):
            return cls(data["pid"], data["start"], str(data.get("boot", "")))
        return None

    def to_dict(self) -> dict[str, int | str]:
        return {"pid": self.pid, "start": self.start, "boot": self.boot}

    def _same(self, fields: list[str] | None) -> bool:
        return fields is not None and int(fields[19]) == self.start and self.boot == boot_id()

    def alive(self) -> bool:
        """Running, and the very process recorded (not a zombie, not a reused pid, this boot)."""
        fields = _stat_fields(self.pid)
        return self._same(fields) and fields[0] != "Z"  # type: ignore[index]

    def stopped(self) -> bool:
        fields = _stat_fields(self.pid)
        return self._same(fields) and fields[0] == "T"  # type: ignore[index]

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to this process and no other; False if it is gone (or the pid is someone else's)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if not self.alive():  # the pidfd pins a process: this check cannot race with a reused pid
                return False
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return False
            return True
        finally:
            os.close(fd)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            try:
                os.waitpid(self.pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def __str__(self) -> str:
        return f"pid {self.pid}"
