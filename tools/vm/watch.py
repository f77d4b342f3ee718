#!/usr/bin/env python3
"""In the guest: a heartbeat the host watches, and what to look at when it stops.

Locked in memory (mlockall) so that it keeps beating while everything else may be
in swap: every few seconds one ``VMTEST-BEAT`` line (swap in use, pages swapped
out and in so far, available memory), one ``VMTEST-IO`` line (requests to each loop
device, the daemons' CPU time), and, for each process named on the command
line, any of its mappings that has pages in swap: a daemon on the swap path must
never have any (its own swap-in would wait for itself).

Standard library only; runs with the system's python3 (``-I``: nothing from the
working directory).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

MCL_CURRENT, MCL_FUTURE = 1, 2
INTERVAL = 5.0


def vmstat(*names: str) -> dict[str, int]:
    found = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in names:
                found[key] = int(value)
    return found


def meminfo(*names: str) -> dict[str, int]:
    found = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in names:
                found[key] = int(value.split()[0])
    return found


def swap_used_kib() -> int:
    with open("/proc/swaps") as f:
        return sum(int(line.split()[3]) for line in list(f)[1:] if line.strip())


def swapped_mappings(pid: int) -> list[str]:
    """Mappings of ``pid`` with pages in swap, as 'range name swap=N kB'."""
    found = []
    try:
        with open(f"/proc/{pid}/smaps") as f:
            head = ""
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    head = line.strip()
                elif line.startswith("Swap:") and int(line.split()[1]):
                    parts = head.split(None, 5)
                    found.append(f"{parts[0]} {parts[5] if len(parts) > 5 else '[anon]'} swap={line.split()[1]}kB")
    except OSError:
        pass
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_requests() -> str:
    """Each loop device's requests so far, 'loopN=reads/KiB read,writes/KiB written':
    with pswpin/pswpout, how many pages each request to the swap device carried."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/stat") as f:
                s = [int(x) for x in f.read().split()]
        except OSError:
            continue
        if s[0] or s[4]:
            found.append(f"{name}={s[0]}/{s[2] // 2},{s[4]}/{s[6] // 2}")
    return " ".join(found)


def main() -> int:
    if ctypes.CDLL(None, use_errno=True).mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        print(f"VMTEST-WATCH: mlockall failed: {os.strerror(ctypes.get_errno())}", flush=True)
    pids = [int(p) for p in sys.argv[1:]]
    start = time.monotonic()
    while True:
        v = vmstat("pswpin", "pswpout", "oom_kill")
        m = meminfo("MemAvailable", "Mlocked")
        print(f"VMTEST-BEAT t={time.monotonic() - start:.0f}s swap_used={swap_used_kib()}kB "
              f"pswpout={v.get('pswpout', 0)} pswpin={v.get('pswpin', 0)} oom_kill={v.get('oom_kill', 0)} "
              f"avail={m.get('MemAvailable', 0)}kB mlocked={m.get('Mlocked', 0)}kB", flush=True)
        if pids or loop_requests():
            cpu = " ".join(f"cpu{pid}={cpu_seconds(pid):.0f}s" for pid in pids)
            print(f"VMTEST-IO {loop_requests()} {cpu}", flush=True)
        for pid in pids:
            for mapping in swapped_mappings(pid):
                print(f"VMTEST-SWAPPED pid={pid} {mapping}", flush=True)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
