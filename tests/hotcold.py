#!/usr/bin/env python3
"""A workload with a hot and a cold half, for the offload controller's live test.

    python hotcold.py HOT_MIB COLD_MIB METRIC_FILE

Fills both halves with pages that name their own index and a seed, prints
``ready``, then reads one word of every hot page, pass after pass, rewriting
METRIC_FILE with its passes per second.  On SIGUSR1 it prints, as a JSON line,
the fraction of each half now in swap, from /proc/self/pagemap (bit 62;
reading pagemap does not fault a page in): {"hot_swapped": .., "cold_swapped": ..}.
On SIGTERM or SIGINT it checks every page and prints {"bad_pages": ..}.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import struct
import sys
import time

PAGE = 4096
SWAPPED = 1 << 62


def fill(region: mmap.mmap, seed: int, base: int) -> None:
    pool = random.Random(seed).randbytes(1 << 20)
    for i in range(len(region) // PAGE):
        off = (i * 4099) % (len(pool) - PAGE)
        region[i * PAGE:(i + 1) * PAGE] = struct.pack("<QQ", base + i, seed) + pool[off:off + PAGE - 16]


def bad(region: mmap.mmap, seed: int, base: int) -> int:
    pool = random.Random(seed).randbytes(1 << 20)
    wrong = 0
    for i in range(len(region) // PAGE):
        off = (i * 4099) % (len(pool) - PAGE)
        if region[i * PAGE:(i + 1) * PAGE] != struct.pack("<QQ", base + i, seed) + pool[off:off + PAGE - 16]:
            wrong += 1
    return wrong


def swapped(region: mmap.mmap) -> float:
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    n = len(region) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entries = struct.unpack(f"<{n}Q", f.read(8 * n))
    return sum(1 for e in entries if e & SWAPPED) / n


def main() -> int:
    hot_mib, cold_mib, metric = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    seed = random.randrange(1 << 63)
    private = dict(flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory would not show as swapped
    hot, cold = mmap.mmap(-1, hot_mib << 20, **private), mmap.mmap(-1, cold_mib << 20, **private)
    fill(hot, seed, 0)
    fill(cold, seed, 1 << 40)
    stop: list[int] = []
    asked: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGUSR1, lambda signum, frame: asked.append(signum))
    print("ready", flush=True)
    passes, since = 0, time.monotonic()
    while not stop:
        for i in range(0, len(hot), PAGE):
            hot[i]  # noqa: B018 (the touch is the point)
        passes += 1
        if asked:
            asked.clear()
            print(json.dumps({"hot_swapped": swapped(hot), "cold_swapped": swapped(cold)}), flush=True)
        now = time.monotonic()
        if now - since >= 1.0:
            with open(metric + ".tmp", "w") as f:
                json.dump({"passes_per_s": passes / (now - since)}, f)
            os.replace(metric + ".tmp", metric)
            passes, since = 0, now
    result = {"bad_pages": bad(hot, seed, 0) + bad(cold, seed, 1 << 40)}
    print(json.dumps(result), flush=True)
    return 1 if result["bad_pages"] else 0


if __name__ == "__main__":
    sys.exit(main())
