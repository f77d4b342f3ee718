#!/usr/bin/env python3
"""A Zipf-skewed GET/SET load on a redis-server, reporting its own throughput, then checking every key.

    python zipfload.py SOCKET KEYS SEED METRIC_FILE [--hot N] [--skew S] [--sets F] [--pipeline N]

Keys ``k0 .. k{KEYS-1}`` hold ``vswapctl.redisload.value`` records.  The load
touches the first N of them (``--hot``, default a quarter of KEYS), the hot set:
key rank r < N is drawn with probability proportional to 1 / (r + 1) ** S
(default S = 0.99, YCSB's zipfian constant), so k0 is the hottest; the other
keys are the cold data, read only by the final check.  A fraction F of the commands
(default 0.05) are SETs, each writing the key's next version.  Every second it
rewrites METRIC_FILE with {"get_ops_per_s": .., "set_ops_per_s": ..}; on
SIGTERM or SIGINT it stops, reads every key back and prints one JSON line:
{"gets": .., "sets": .., "keys": .., "bad_values": ..}; exit 1 if any is wrong.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import time

import redis

from vswapctl.redisload import BATCH, value
from vswapctl.workload import json_pool


def cumulative(keys: int, skew: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank + 1) ** skew for rank in range(keys)))


def expected(pool: bytes, seed: int, key: int, version: int) -> bytes:
    return value(pool, seed + version, key)  # version 0 is the record the dataset was loaded with


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("socket")
    ap.add_argument("keys", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("metric")
    ap.add_argument("--hot", type=int, help="keys in the hot set (default KEYS // 4)")
    ap.add_argument("--skew", type=float, default=0.99)
    ap.add_argument("--sets", type=float, default=0.05)
    ap.add_argument("--pipeline", type=int, default=16)
    args = ap.parse_args()
    stop: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    client = redis.Redis(unix_socket_path=args.socket)
    pool = json_pool(args.seed)
    hot = args.hot if args.hot is not None else args.keys // 4
    if not 0 < hot <= args.keys:
        ap.error(f"--hot {hot} is not between 1 and KEYS")
    cdf = cumulative(hot, args.skew)
    rng = random.Random(args.seed)
    versions: dict[int, int] = {}
    gets = sets = window_gets = window_sets = 0
    since = time.monotonic()
    population = range(hot)
    while not stop:
        pipe = client.pipeline(transaction=False)
        for key in rng.choices(population, cum_weights=cdf, k=args.pipeline):
            if rng.random() < args.sets:
                versions[key] = versions.get(key, 0) + 1
                pipe.set(b"k%d" % key, expected(pool, args.seed, key, versions[key]))
                window_sets += 1
            else:
                pipe.get(b"k%d" % key)
                window_gets += 1
        pipe.execute()
        now = time.monotonic()
        if now - since >= 1.0:
            with open(args.metric + ".tmp", "w") as f:
                json.dump({"get_ops_per_s": round(window_gets / (now - since)),
                           "set_ops_per_s": round(window_sets / (now - since))}, f)
            os.replace(args.metric + ".tmp", args.metric)
            gets, sets = gets + window_gets, sets + window_sets
            window_gets = window_sets = 0
            since = now
    bad = 0
    for at in range(0, args.keys, BATCH):
        batch = range(at, min(at + BATCH, args.keys))
        for key, got in zip(batch, client.mget([b"k%d" % k for k in batch]), strict=True):
            bad += got != expected(pool, args.seed, key, versions.get(key, 0))
    print(json.dumps({"gets": gets + window_gets, "sets": sets + window_sets, "keys": args.keys, "bad_values": bad}),
          flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
