#!/usr/bin/env python3
"""Verifying swap workload: fill memory with per-page contents, then check every page.

Run it inside a memory cgroup smaller than --size and its pages must go
through swap and come back intact.  Prints one JSON line:
{"pages": N, "bad_pages": B, "fill_seconds": .., "verify_seconds": .., "marks": ..,
"cpu_seconds": .., ...} and exits 1 if any page came back wrong.  ``marks`` are the
phases' [start, end] on ``time.monotonic`` (CLOCK_MONOTONIC: the bench reads its daemons'
CPU on the same clock, ``vswapctl.cpuwatch``); ``cpu_seconds`` is this process's own
user and system time in each phase, the kernel's reclaim done in its name included.

Every page is built from its own index and a per-run seed, so a page that comes
back from the wrong slot, from an older run, or as zeros is caught:

  incompressible (default)  a 16-byte header (index, seed), then a 4080-byte
                            window, chosen by the index, of a random pool of a
                            few MiB made from the seed.  zram compresses page by
                            page, and no page compresses: swap has to carry
                            every byte, as it would for real data.
  compressible              one 16-byte cell (index ^ seed, a random number)
                            repeated: compresses to almost nothing.
  json                      the header, then a window of a pool of JSON records
                            (ids, users, tags and text drawn from a vocabulary
                            with Zipf-distributed frequencies, s = 1.1): pages
                            that compress as application data does (zlib at
                            its fastest: about 2.5 to 1).

Making and checking a page is a slice and a compare at C speed either way: the
workload's own time is part of what the benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import resource
import struct
import sys
import time
from collections.abc import Callable

PAGE = 4096
DATA_KINDS = ("incompressible", "compressible", "json")
HEADER = 16
WINDOW = PAGE - HEADER
POOL_SIZE = 4 << 20  # random bytes made once per run; each page is a window of it
STRIDE = 4099  # a prime above WINDOW: neighbouring pages take windows that do not overlap
_MASK64 = (1 << 64) - 1


class Pages:
    """What every page of one run must hold: ``expected(index)`` is the page's 4096 bytes."""

    expected: Callable[[int], bytes]

    def __init__(self, seed: int, npages: int, data: str = "incompressible") -> None:
        if data not in DATA_KINDS:
            raise ValueError(f"data {data!r} is not one of {', '.join(DATA_KINDS)}")
        self.seed = seed & _MASK64
        self.data = data
        if data in ("incompressible", "json"):
            self._pool = random.Random(seed).randbytes(POOL_SIZE) if data == "incompressible" else json_pool(seed)
            self.expected = self._incompressible
        else:
            rng = random.Random(seed)
            self._rnds = [rng.getrandbits(64) for _ in range(npages)]
            self.expected = self._compressible

    def _incompressible(self, index: int) -> bytes:
        offset = (index * STRIDE) % (POOL_SIZE - WINDOW)
        return struct.pack("<QQ", index, self.seed) + self._pool[offset : offset + WINDOW]

    def _compressible(self, index: int) -> bytes:
        return struct.pack("<QQ", (index ^ self.seed) & _MASK64, self._rnds[index]) * (PAGE // 16)

    def check(self, page: bytes, index: int) -> bool:
        return page == self.expected(index)


ZIPF_S = 1.1
VOCABULARY = 8192


def json_pool(seed: int, size: int = POOL_SIZE) -> bytes:
    """``size`` bytes of JSON records, one per line, made from ``seed``: what a cache
    or a document store holds.  Words come from a vocabulary of ``VOCABULARY``
    made-up words whose frequencies follow Zipf's law (rank r is drawn in
    proportion to 1 / r ** ``ZIPF_S``), as words in text do."""
    rng = random.Random(seed ^ 0x6A736F6E)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(VOCABULARY)]
    cum, total = [], 0.0
    for rank in range(1, VOCABULARY + 1):
        total += 1.0 / rank**ZIPF_S
        cum.append(total)
    lines, length, n = [], 0, 0
    while length < size:
        drawn = rng.choices(words, cum_weights=cum, k=26)
        record = {"id": n, "user": drawn[0], "tags": drawn[1:4], "score": round(rng.random() * 100, 2),
                  "active": rng.random() < 0.7, "text": " ".join(drawn[4 : 4 + rng.randint(8, 22)])}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        lines.append(line)
        length += len(line)
        n += 1
    return "".join(lines).encode()[:size]


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    ap.add_argument("--data", choices=DATA_KINDS, default="incompressible",
                    help="page contents (default incompressible; see above)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    npages = size // PAGE
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    pages = Pages(seed, npages, args.data)
    expected = pages.expected
    rng = random.Random(seed ^ 0x5EED)
    mem = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cpu_start = own_cpu_seconds()
    t0 = time.monotonic()
    for i in range(npages):
        mem[i * PAGE : (i + 1) * PAGE] = expected(i)
    t1 = time.monotonic()
    cpu = [round(own_cpu_seconds() - cpu_start, 3)]
    marks = [[t0, t1]]
    bad = 0
    bad_examples: list[int] = []
    order = list(range(npages))
    pass_times = []
    for p in range(args.passes):
        if p:
            rng.shuffle(order)
        cpu_start = own_cpu_seconds()
        start = time.monotonic()
        for i in order:
            if mem[i * PAGE : (i + 1) * PAGE] != expected(i):
                bad += 1
                if len(bad_examples) < 10:
                    bad_examples.append(i)
        end = time.monotonic()
        cpu.append(round(own_cpu_seconds() - cpu_start, 3))
        marks.append([start, end])
        pass_times.append(round(end - start, 3))
    result = {
        "pages": npages,
        "bad_pages": bad,
        "bad_examples": bad_examples,
        "seed": seed,
        "data": args.data,
        "fill_seconds": round(t1 - t0, 3),
        "verify_seconds": pass_times,
        "marks": marks,
        "cpu_seconds": cpu,
    }
    print(json.dumps(result), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
