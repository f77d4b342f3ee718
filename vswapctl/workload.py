#!/usr/bin/env python3
"""Verifying swap workload: fill memory with per-page patterns, then check every page.

Run it inside a memory cgroup smaller than --size and its pages must go
through swap and come back intact.  Prints one JSON line:
{"pages": N, "bad_pages": B, "fill_seconds": .., "verify_seconds": .., ...}
and exits 1 if any page came back wrong.

Each page holds its own index and a per-run seed in every 16-byte cell, so a
page that comes back from the wrong slot, an older run, or as zeros is caught.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import sys
import time

PAGE = 4096


def pattern(index: int, seed: int, rnd: int) -> bytes:
    return struct.pack("<QQ", index ^ seed, rnd) * (PAGE // 16)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="memory to fill (K/M/G; default 256M)")
    ap.add_argument("--passes", type=int, default=2, help="verification passes (the second in random order)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    npages = size // PAGE
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    rnds = [rng.getrandbits(64) for _ in range(npages)]
    mem = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t0 = time.monotonic()
    for i in range(npages):
        mem[i * PAGE : (i + 1) * PAGE] = pattern(i, seed, rnds[i])
    t1 = time.monotonic()
    bad = 0
    bad_examples: list[int] = []
    order = list(range(npages))
    pass_times = []
    for p in range(args.passes):
        if p:
            rng.shuffle(order)
        start = time.monotonic()
        for i in order:
            if mem[i * PAGE : (i + 1) * PAGE] != pattern(i, seed, rnds[i]):
                bad += 1
                if len(bad_examples) < 10:
                    bad_examples.append(i)
        pass_times.append(round(time.monotonic() - start, 3))
    result = {
        "pages": npages,
        "bad_pages": bad,
        "bad_examples": bad_examples,
        "seed": seed,
        "fill_seconds": round(t1 - t0, 3),
        "verify_seconds": pass_times,
    }
    print(json.dumps(result), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
