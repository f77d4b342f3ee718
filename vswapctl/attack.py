"""``vswapctl attack``: a hoststore under hostile connections, with a good client timing it.

A hoststore process listens on a private unix socket and on loopback TCP.  A
good client (root, on the unix socket) stores and reads 8-page batches and
times each round trip, first alone, then while a separate process keeps
about 50 hostile TCP connections going: garbage, oversized length prefixes,
a byte a second, half-open connections, connection floods, pipelined floods
of the largest ``get`` and streams of huge ``invalidate`` requests.  Reports
the good client's p50/p99 without and with the attack, the store's RSS
growth, and the store's counters of connections closed or refused, by reason.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from array import array
from typing import Any

import trio

from hoststore import protocol as p
from hoststore.address import Address
from hoststore.messages import (
    MAX_GET_PAGES,
    MAX_SEQ,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    ROLE_PAGER,
    Get,
    Hello,
    Invalidate,
    Put,
    Stats,
    Welcome,
)

from . import launch
from .benchstore import bench_store

# Hostile connections by kind; 50 in all.
KINDS = {
    "garbage": 6,
    "oversized": 6,
    "byte_a_second": 8,
    "half_open": 8,
    "connection_flood": 10,
    "get_flood": 6,
    "invalidate_stream": 6,
}
CLOSE_REASONS = ("protocol_errors", "closed_oversized_frame", "closed_hello_timeout", "closed_idle",
                 "refused_connections", "refused_peer_connections", "refused_connection_rate", "refused_auth", "hello_refused",
                 "bad_requests", "connection_errors", "fair_waits")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


# -- the hostile side (its own process) ---------------------------------------------------


async def _next_event(stream: trio.SocketStream, conn: p.Connection) -> p.Event:
    """The next message from the store; BrokenResourceError if it hung up first."""
    while (event := conn.next_event()) is None:
        data = await stream.receive_some(1 << 20)
        if not data:
            raise trio.BrokenResourceError("closed by the store")
        conn.receive_data(data)
    return event


class _Hostile:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connections = 0

    async def _connect(self) -> trio.SocketStream | None:
        try:
            stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError:
            await trio.sleep(0.05)
            return None
        self.connections += 1
        return stream

    @staticmethod
    async def _drain(stream: trio.SocketStream, limit: float) -> None:
        """Read until the store hangs up (or ``limit`` passes)."""
        with trio.move_on_after(limit):
            try:
                while await stream.receive_some(1 << 16):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _hello(self, stream: trio.SocketStream, name: str, npages: int) -> p.Connection | None:
        conn = p.Connection("client")
        try:
            with trio.fail_after(5):
                if not isinstance(await _next_event(stream, conn), Welcome):
                    return None
                hello = Hello(PROTOCOL_VERSION, name, ROLE_PAGER, npages * PAGE_SIZE, os.urandom(8).hex(),
                              os.urandom(16))
                await stream.send_all(conn.send_request(hello)[1])
                event = await _next_event(stream, conn)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError):
            return None
        return conn if isinstance(event, p.Response) and event.error is None else None

    async def _pipeline(self, name: str, npages: int, first: list[Any], request: Any) -> None:
        """Say hello, send ``first``, then ``request`` 64 at a time for ever, reading the
        answers as fast as they come (at most 8 + 64 unanswered); again on a new
        connection whenever the store closes this one."""
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                conn = await self._hello(stream, f"{name}-{random.random()}", npages)
                if conn is None:
                    await trio.sleep(0.1)
                    continue
                try:
                    for message in first:
                        await stream.send_all(conn.send_request(message)[1])
                    while True:
                        await stream.send_all(b"".join(conn.send_request(request)[1] for _ in range(64)))
                        while conn.pending > 8:
                            await _next_event(stream, conn)
                except (trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError):
                    pass

    async def garbage(self, i: int) -> None:
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                try:
                    await stream.send_all(os.urandom(4096))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await self._drain(stream, 5)

    async def oversized(self, i: int) -> None:
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                try:
                    await stream.send_all(p.HEADER.pack(0x7FFFFFFF) + b"\x00" * 1024)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await self._drain(stream, 5)

    async def byte_a_second(self, i: int) -> None:
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                try:
                    for b in p.HEADER.pack(200) + os.urandom(200):
                        await stream.send_all(bytes([b]))
                        await trio.sleep(1.0)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def half_open(self, i: int) -> None:
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                await self._drain(stream, 120)

    async def connection_flood(self, i: int) -> None:
        while True:
            if (stream := await self._connect()) is None:
                continue
            await stream.aclose()
            await trio.sleep(0.005)

    async def get_flood(self, i: int) -> None:
        """The largest legal gets, pipelined."""
        await self._pipeline(f"hostile-get-{i}", 4096, [Put(0, 1, os.urandom(64 * PAGE_SIZE))],
                             Get(array("Q", range(MAX_GET_PAGES))))

    async def invalidate_stream(self, i: int) -> None:
        """Invalidates of a whole 4 TiB device, pipelined."""
        await self._pipeline(f"hostile-inv-{i}", 1 << 30, [], Invalidate(0, 1 << 30, MAX_SEQ))


async def _hostile_main(host: str, port: int, seconds: float, kinds: dict[str, int]) -> int:
    attacker = _Hostile(host, port)
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for kind, n in kinds.items():
                for i in range(n):
                    nursery.start_soon(getattr(attacker, kind), i)
    return attacker.connections


# -- the good client and the harness ------------------------------------------------------------


async def _good_client(address: Address, seconds: float) -> list[float]:
    from vswapfs.hostclient import HostClient

    client = HostClient(address, f"good-{os.getpid()}", 4096 * PAGE_SIZE, connect_timeout=10)
    latencies: list[float] = []
    data = os.urandom(8 * PAGE_SIZE)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.wait_connected()
        seq, n = 0, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            first = (n * 8) % 4088
            seq += 1
            start = time.perf_counter()
            statuses = await client.put(first, seq, data)
            latencies.append(time.perf_counter() - start)
            if statuses != bytes(8):
                raise RuntimeError(f"the good client's put was refused: {list(statuses)}")
            start = time.perf_counter()
            got = await client.get(array("Q", range(first, first + 8)))
            latencies.append(time.perf_counter() - start)
            if got.data != data:
                raise RuntimeError("the good client read back wrong data")
            n += 1
        await client.invalidate(0, 4096, MAX_SEQ)
        nursery.cancel_scope.cancel()
    return latencies


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    """User plus system time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(latencies: list[float]) -> dict[str, float]:
    return {"requests": len(latencies), "p50_ms": round(statistics.median(latencies) * 1e3, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1e3, 3),
            "max_ms": round(max(latencies) * 1e3, 3)}


def run(seconds: float = 10.0, hello_timeout: float = 2.0, kinds: dict[str, int] | None = None) -> dict[str, Any]:
    from vswapfs.hostclient import query

    port = _free_port()
    attacker: subprocess.Popen[str] | None = None
    with bench_store("vswapctl-attack-", "--listen", f"tcp:127.0.0.1:{port}", "--insecure-tcp", "--capacity", "256M",
                     "--hello-timeout", str(hello_timeout), "--idle-timeout", str(hello_timeout * 3),
                     "--drain-timeout", "1") as (store, sock, _):
        try:
            address = Address("unix", path=sock)
            trio.run(_good_client, address, 1.0)  # warm up: the store's slab and index exist
            base = trio.run(_good_client, address, seconds)
            rss_before = _rss_kib(store.pid)
            kinds = kinds or KINDS
            attacker = subprocess.Popen(["nice", "-n", "19", *launch.module_argv(
                "vswapctl.attack", "127.0.0.1", str(port), str(seconds + 4), json.dumps(kinds))],
                cwd=launch.WORKDIR, stdout=subprocess.PIPE, text=True)
            time.sleep(2.0)  # every kind of attack under way
            cpu_start, wall_start = (_cpu_seconds(store.pid), _cpu_seconds(attacker.pid)), time.monotonic()
            attacked = trio.run(_good_client, address, seconds)
            wall = time.monotonic() - wall_start
            cpu = {"store": round((_cpu_seconds(store.pid) - cpu_start[0]) / wall * 100),
                   "attackers": round((_cpu_seconds(attacker.pid) - cpu_start[1]) / wall * 100)}
            rss_peak = _rss_kib(store.pid)
            out, _ = attacker.communicate(timeout=60)
            stats = trio.run(query, address, Stats())
            rss_after = _rss_kib(store.pid)
            alive = store.poll() is None
        finally:
            if attacker is not None and attacker.poll() is None:
                attacker.kill()
                attacker.wait()
    return {
        "seconds": seconds,
        "hostile_connections_at_once": sum(kinds.values()),
        "hostile_kinds": kinds,
        "hostile_connections_opened": int(out.strip() or 0),
        "good_alone": _summary(base),
        "good_under_attack": _summary(attacked),
        "cpu_percent_under_attack": cpu,
        "rss_kib": {"before_attack": rss_before, "during_attack": rss_peak, "after_attack": rss_after,
                    "growth": max(rss_peak, rss_after) - rss_before},
        "closed_by_reason": {k: stats.get(k, 0) for k in CLOSE_REASONS},
        "connections": stats.get("connections", 0),
        "store_alive": alive,
    }


def main(argv: list[str]) -> int:
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    print(trio.run(_hostile_main, host, port, seconds, json.loads(argv[3]) if len(argv) > 3 else KINDS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
