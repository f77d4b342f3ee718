"""A real process's memory through swap: redis-server holding a dataset larger than its cgroup.

    python -m vswapctl.redisload --size 256M

Starts redis-server as a child (so in the caller's memory cgroup: run this
inside one smaller than ``--size``), on a unix socket in a private directory,
with no persistence; fills it with records of about 1 KiB (JSON-like text
from ``vswapctl.workload``'s Zipf vocabulary, each naming its key and the
run's seed), then reads every value back in key order and again in a random
order, checking each.  What swap carries is redis's own memory: its hash
table, its allocator's pages and the values in them, as any application's
would be.  Prints one JSON line, as ``vswapctl.workload`` does:
{"pages": keys, "bad_pages": wrong values, "fill_seconds": .., "verify_seconds": [seq, random],
"marks": [[start, end] of each phase], ...}
and exits 1 if any value came back wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import redis

from vswapcommon.cliutil import argtype
from vswapcommon.sizes import parse_size

from .workload import json_pool

RECORD = 1024  # bytes of a value
BATCH = 256  # commands per pipeline
RANDOM_BATCH = 16  # keys per MGET when reading in a random order
START_TIMEOUT = 30.0


def value(pool: bytes, seed: int, key: int) -> bytes:
    head = b"%d:%d:" % (key, seed)
    at = (key * 8191) % (len(pool) - RECORD)
    return head + pool[at : at + RECORD - len(head)]


def start(directory: str, preexec_fn: Callable[[], None] | None = None) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    """redis-server on ``socket_path(directory)``, no persistence; ``preexec_fn`` runs in
    the child before it execs (to join a memory cgroup)."""
    sock = socket_path(directory)
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redisload: no redis-server on PATH (apt-get install redis-server)")
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--save", "",
                             "--appendonly", "no", "--dir", directory, "--daemonize", "no", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    try:
        return proc, _answering(proc, sock)
    except BaseException:  # a signal while it starts, as much as a server that never answers
        proc.kill()
        proc.wait()
        raise


def _answering(proc: subprocess.Popen[bytes], sock: str) -> redis.Redis:
    deadline = time.monotonic() + START_TIMEOUT
    client = redis.Redis(unix_socket_path=sock)
    while True:
        try:
            client.ping()
            return client
        except (redis.ConnectionError, FileNotFoundError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise SystemExit(f"redisload: redis-server did not start: {proc.stderr.read().decode()[-300:]}"
                                 if proc.stderr else "redisload: redis-server did not start") from None
            time.sleep(0.05)


def socket_path(directory: str) -> str:
    return os.path.join(directory, "redis.sock")


def _batches(keys: list[int], size: int) -> Iterator[list[int]]:
    for at in range(0, len(keys), size):
        yield keys[at : at + size]


def _check(client: redis.Redis, pool: bytes, seed: int, keys: list[int], size: int) -> tuple[int, float]:
    """Read ``keys`` back, ``size`` to an MGET; (wrong values, seconds)."""
    bad = 0
    start = time.perf_counter()
    for batch in _batches(keys, size):
        for key, got in zip(batch, client.mget([b"k%d" % k for k in batch])):
            bad += got != value(pool, seed, key)
    return bad, time.perf_counter() - start


def run(size: int, seed: int) -> dict[str, object]:
    directory = tempfile.mkdtemp(prefix="vswapctl-redisload-")
    os.chmod(directory, 0o700)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, client = start(directory)
        pool = json_pool(seed)
        keys = list(range(size // RECORD))
        marks = [[time.monotonic()]]
        began = time.perf_counter()
        for batch in _batches(keys, BATCH):
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.set(b"k%d" % key, value(pool, seed, key))
            pipe.execute()
        fill = time.perf_counter() - began
        marks[0].append(time.monotonic())
        used = client.info("memory").get("used_memory", 0)
        marks.append([time.monotonic()])
        bad_seq, seq = _check(client, pool, seed, keys, BATCH)
        marks[1].append(time.monotonic())
        shuffled = keys[:]
        random.Random(seed).shuffle(shuffled)
        marks.append([time.monotonic()])
        bad_rnd, rnd = _check(client, pool, seed, shuffled, RANDOM_BATCH)
        marks[2].append(time.monotonic())
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return {"pages": len(keys), "bad_pages": bad_seq + bad_rnd, "bad_examples": [], "seed": seed, "data": "redis",
            "fill_seconds": round(fill, 3), "verify_seconds": [round(seq, 3), round(rnd, 3)],
            "redis_used_memory": used, "marks": marks}


def _exit_on(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vswapctl.redisload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=argtype(parse_size), default=parse_size("256M"),
                    help="bytes of values to store (K/M/G suffixes; default 256M)")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed (default: a random one)")
    args = ap.parse_args(argv)
    # A signal ends the run through its finally: redis-server never outlives it (its memory,
    # swapped out, would stay on the device, and the workload's cgroup could not be removed).
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _exit_on)
    result = run(args.size, args.seed if args.seed is not None else random.getrandbits(32))
    print(json.dumps(result), flush=True)
    return 1 if result["bad_pages"] else 0


if __name__ == "__main__":
    sys.exit(main())
