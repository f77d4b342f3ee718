"""``vswapctl attack``: a hoststore under hostile connections, with good clients timing it.

A hoststore process listens on a private unix socket and on loopback TCP, with
a token.  A good pager (root, on the unix socket) stores and reads 8-page
batches and times each round trip, first alone, then while a separate process
keeps about 50 hostile TCP connections going, each from one of 127.0.0.2-7
in turn: garbage, oversized length prefixes, a byte a second, connections
that never say hello, connection floods, hellos without the token, and, with
the token (a client gone bad): pipelined floods of the largest ``get``, the
same never reading the answers, streams of huge ``invalidate`` requests, and
puts of the largest legal size stalled one byte short.  Meanwhile an admin
observer asks for the store's stats on a fresh connection ten times a second,
as ``vswapctl stats`` does, and four more good clients on the unix socket keep
storing pages that the store hands back to them under memory pressure (the
store's pressure is a file the harness sets high; its admission policy is
accept-all so that the good pager's puts are admitted all the same).  All of
them run in both phases, and the store's growth is its peak RSS under attack
less its peak RSS in the phase before, when only they ran: what they cost it
is in both, and a hand-back burst of theirs (the store briefly holds several
MiB for one) is not the attack's.  (Over the RSS sampled once just before the
attack, as ``growth_over_before``, such a burst under attack would count.)
Reports the good clients' latencies, the pages handed back and whether any
good client lost its connection, the store's peak RSS growth, and its counters
of connections closed or refused, by reason.
The store runs with its defaults for every connection limit and timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any

import trio

from pagewire import auth
from pagewire import protocol as p
from pagewire.address import Address
from pagewire.messages import (
    MAX_GET_PAGES,
    MAX_SEQ,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    ROLE_PAGER,
    Get,
    HandBack,
    MAX_PUT_PAGES,
    Hello,
    Invalidate,
    Put,
    Stats,
    TakeStatus,
    Welcome,
)

from . import launch
from .benchstore import bench_store
from .procs import cpu_seconds

# Hostile connections by kind; 50 in all.
KINDS = {
    "garbage": 2,
    "oversized": 2,
    "byte_a_second": 3,
    "half_open": 9,
    "connection_flood": 3,
    "tokenless_hello": 3,
    "get_flood": 3,
    "unread_gets": 6,
    "invalidate_stream": 3,
    "stalled_put": 16,
}
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 8))  # loopback addresses the attackers connect from
# Good clients storing pages the store hands back to them under pressure: what the store
# sends them itself must never get them closed (B1 of the review of issue 17).
HANDED_BACK_CLIENTS = 4
HANDED_BACK_PAGES = 256  # each stores this many pages (1 MiB), again every second
CLOSE_REASONS = ("protocol_errors", "closed_oversized_frame", "closed_hello_timeout", "closed_hello_pool",
                 "closed_idle", "closed_frame_timeout", "closed_in_flight", "refused_tcp_connections",
                 "refused_peer_connections", "refused_connection_rate", "refused_auth", "hello_refused",
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
    def __init__(self, host: str, port: int, token: bytes) -> None:
        self.host, self.port, self.token = host, port, token
        self.connections = 0

    async def _connect(self) -> trio.SocketStream | None:
        """A connection from the next of several loopback addresses (the store must
        count them as one host)."""
        source = SOURCES[self.connections % len(SOURCES)]
        try:
            stream = await trio.open_tcp_stream(self.host, self.port, local_address=source)
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

    async def _hello(self, stream: trio.SocketStream, name: str, npages: int,
                     token: bytes | None) -> p.Connection | None:
        """Say hello (proving ``token`` if given); the connection, or None if refused."""
        conn = p.Connection("client")
        try:
            with trio.fail_after(5):
                welcome = await _next_event(stream, conn)
                if not isinstance(welcome, Welcome):
                    return None
                nonce = auth.nonce()
                proof = auth.token_proof(token, "client", name, welcome.nonce, nonce) if token else None
                hello = Hello(PROTOCOL_VERSION, name, ROLE_PAGER, npages * PAGE_SIZE, os.urandom(8).hex(), nonce,
                              auth=proof)
                await stream.send_all(conn.send_request(hello)[1])
                event = await _next_event(stream, conn)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError):
            return None
        return conn if isinstance(event, p.Response) and event.error is None else None

    async def _as_client(self, name: str, npages: int, attack: Any) -> None:
        """Again and again: connect, say hello with the token, then ``attack(stream, conn)``
        until the store closes the connection."""
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                conn = await self._hello(stream, f"{name}-{random.random()}", npages, self.token)
                if conn is None:
                    await trio.sleep(0.1)
                    continue
                try:
                    await attack(stream, conn)
                except (trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError):
                    pass

    async def _pipeline(self, name: str, npages: int, first: list[Any], request: Any, read: bool = True) -> None:
        """As a client: send ``first``, then ``request`` 64 at a time for ever, reading
        the answers as fast as they come (at most 8 + 64 unanswered), or, if not
        ``read``, never reading them (sending until the store stops reading)."""

        async def attack(stream: trio.SocketStream, conn: p.Connection) -> None:
            for message in first:
                await stream.send_all(conn.send_request(message)[1])
            while True:
                await stream.send_all(b"".join(conn.send_request(request)[1] for _ in range(64)))
                while read and conn.pending > 8:
                    await _next_event(stream, conn)

        await self._as_client(name, npages, attack)

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

    async def tokenless_hello(self, i: int) -> None:
        """Hellos without the token (refused), as fast as the store lets us connect."""
        while True:
            if (stream := await self._connect()) is None:
                continue
            async with stream:
                if await self._hello(stream, f"hostile-nohello-{i}", 4096, None) is not None:
                    await self._drain(stream, 3600)  # a store without a token took it: hold the slot

    async def get_flood(self, i: int) -> None:
        """The largest legal gets, pipelined."""
        await self._pipeline(f"hostile-get-{i}", 4096, [Put(0, 1, os.urandom(64 * PAGE_SIZE))],
                             Get(array("Q", range(MAX_GET_PAGES))))

    async def unread_gets(self, i: int) -> None:
        """The largest legal gets (of pages never stored: the answers are as large, and
        the store's growth is not its page data), pipelined, and not one answer read:
        the store's answers back up on this connection."""
        await self._pipeline(f"hostile-unread-{i}", 4096, [], Get(array("Q", range(MAX_GET_PAGES))), read=False)

    async def stalled_put(self, i: int) -> None:
        """A put of the largest size the store takes, all but its last byte, then
        nothing: the store holds the start of a frame that never ends."""

        async def attack(stream: trio.SocketStream, conn: p.Connection) -> None:
            data = conn.send_request(Put(0, 1, os.urandom(MAX_PUT_PAGES * PAGE_SIZE)))[1]
            await stream.send_all(data[:-1])
            await self._drain(stream, 3600)

        await self._as_client(f"hostile-stall-{i}", 4096, attack)

    async def invalidate_stream(self, i: int) -> None:
        """Invalidates of a whole 4 TiB device, pipelined."""
        await self._pipeline(f"hostile-inv-{i}", 1 << 30, [], Invalidate(0, 1 << 30, MAX_SEQ))


async def _hostile_main(host: str, port: int, seconds: float, kinds: dict[str, int], token: bytes) -> int:
    attacker = _Hostile(host, port, token)
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for kind, n in kinds.items():
                for i in range(n):
                    nursery.start_soon(getattr(attacker, kind), i)
    return attacker.connections


# -- the good client and the harness ------------------------------------------------------------


async def _pager(client: Any, seconds: float, batches: Iterator[int]) -> list[float]:
    """8-page puts and gets for ``seconds``, each checked, timed; ``batches`` numbers
    them (a put's version must be newer than any before it)."""
    latencies: list[float] = []
    data = os.urandom(8 * PAGE_SIZE)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        n = next(batches)
        first = (n * 8) % 4088
        start = time.perf_counter()
        statuses = await client.put(first, n, data)
        latencies.append(time.perf_counter() - start)
        if statuses != bytes(8):
            raise RuntimeError(f"the good client's put was refused: {list(statuses)}")
        start = time.perf_counter()
        got = await client.get(array("Q", range(first, first + 8)))
        latencies.append(time.perf_counter() - start)
        if got.data != data:
            raise RuntimeError("the good client read back wrong data")
    return latencies


async def _observer(address: Address, seconds: float, token: bytes) -> list[float]:
    """An admin's `vswapctl stats`, ten times a second, each on a fresh connection."""
    from vswapfs.hostclient import query

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        stats = await query(address, Stats(), token=token)  # StoreUnavailable/StoreError: the run fails
        latencies.append(time.perf_counter() - start)
        if "clients" not in stats:
            raise RuntimeError("the observer on the unix socket did not get the admin's view")
        await trio.sleep(0.1)
    return latencies


class _HandedBack:
    """A good client on the unix socket that stores HANDED_BACK_PAGES pages, again every
    second, while the store (under pressure) hands them back to it.  Connected before
    the attack, so that what a client costs the store before any page is not counted
    as the attack's; on the wire (no shared staging memory), as vswapfs over TCP is."""

    def __init__(self, address: Address, token: bytes, index: int) -> None:
        from vswapfs.hostclient import HostClient

        self.taken = 0
        self.client = HostClient(address, f"handed-back-{os.getpid()}-{index}", HANDED_BACK_PAGES * PAGE_SIZE,
                                 connect_timeout=10, token=token, share=False)  # on the wire, as hostile ones
        self.client.set_handlers(self._take, lambda: None)

    async def _take(self, handback: HandBack) -> bytes:
        self.taken += len(handback.pages)
        return bytes([TakeStatus.TAKEN]) * len(handback.pages)

    async def store_again(self, seconds: float) -> None:
        from vswapfs.pagestore import StoreUnavailable

        data = os.urandom(MAX_PUT_PAGES * PAGE_SIZE)
        seq = itertools.count(1)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for first in range(0, HANDED_BACK_PAGES, MAX_PUT_PAGES):
                try:
                    await self.client.put(first, next(seq), data)  # refusals are the store's to make
                except StoreUnavailable as exc:
                    raise RuntimeError(f"a good client handed pages back lost its connection: {exc}") from None
            await trio.sleep(1.0)  # the pace of this load, not an ordering

    def report(self) -> dict[str, int]:
        """The pages it took back, and how often it lost its connection (it must not)."""
        from vswapfs.hostclient import LinkCounter

        return {"taken": self.taken, "disconnects": self.client.counters[LinkCounter.DISCONNECTS]}


async def _good_clients(address: Address, seconds: float, token: bytes,
                        phase_starts: Any) -> tuple[dict[str, list[float]], list[dict[str, int]]]:
    """The pager (one connection throughout, so that its shared memory is the same in
    both phases), the observer and the clients handed pages back, alone, then again
    under attack; ``phase_starts(phase)`` is called before each (the second starts the
    attack) and says how long to wait before it.  The first two's latencies by phase,
    and what each of the others took back in all."""
    from vswapfs.hostclient import HostClient

    client = HostClient(address, f"good-{os.getpid()}", 4096 * PAGE_SIZE, connect_timeout=10, token=token)
    results: dict[str, list[float]] = {}
    handed_back = [_HandedBack(address, token, index) for index in range(HANDED_BACK_CLIENTS)]
    batches = itertools.count(1)

    async def observe(phase: str) -> None:
        results[f"observer_{phase}"] = await _observer(address, seconds, token)

    async def page(phase: str) -> None:
        results[f"pager_{phase}"] = await _pager(client, seconds, batches)

    async with trio.open_nursery() as nursery:
        for good in (client, *(other.client for other in handed_back)):
            await nursery.start(good.run)
            await good.wait_connected()
        await _pager(client, 1.0, batches)  # warm up: the store's slab, index and shared memory exist
        for phase in ("alone", "under_attack"):
            await trio.sleep(await trio.to_thread.run_sync(phase_starts, phase))  # the attack gets under way
            async with trio.open_nursery() as both:
                both.start_soon(observe, phase)
                both.start_soon(page, phase)
                for other in handed_back:
                    both.start_soon(other.store_again, seconds)
        await client.invalidate(0, 4096, MAX_SEQ)
        nursery.cancel_scope.cancel()
    return results, [other.report() for other in handed_back]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def _rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


class _PeakRss:
    """The most a process had resident from now on: the kernel's own high-water mark
    (VmHWM, reset through clear_refs) where it can be reset, else samples every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak = _rss_kib(pid)
        self._stop = threading.Event()
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self._thread: threading.Thread | None = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self._peak = max(self._peak, _rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def peak(self) -> int:
        if self._thread is None:
            return max(self._peak, _status_kib(self.pid, "VmHWM"))
        self._stop.set()
        self._thread.join()
        return self._peak


def _cpu_seconds(pid: int) -> float:
    """User plus system time of a process so far (it must still be there)."""
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"process {pid} is gone: its CPU time cannot be read")
    return seconds


def _set_pressure(path: str, percent: float) -> None:
    """The store's memory pressure (--pressure-source file:PATH), replaced whole."""
    with open(f"{path}.new", "w") as f:
        f.write(f"{percent}\n")
    os.replace(f"{path}.new", path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(latencies: list[float]) -> dict[str, float]:
    return {"requests": len(latencies), "p50_ms": round(statistics.median(latencies) * 1e3, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1e3, 3),
            "max_ms": round(max(latencies) * 1e3, 3)}


def run(seconds: float = 10.0, kinds: dict[str, int] | None = None) -> dict[str, Any]:
    """One run: the good clients alone, then under attack and pressure; the store's figures."""
    from vswapfs.hostclient import query

    port = _free_port()
    kinds = kinds or KINDS
    attacker: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="vswapctl-attack-token-") as private:
        token_file = _write_token(private)
        token = auth.load_token(token_file)
        pressure = os.path.join(private, "pressure")
        _set_pressure(pressure, 95.0)  # past the high watermark: the store hands pages back throughout
        with bench_store("vswapctl-attack-", "--listen", f"tcp:127.0.0.1:{port}", "--capacity", "256M",
                         "--token-file", token_file, "--pressure-source", f"file:{pressure}",
                         "--policy", "accept-all", "--drain-timeout", "1") as (store, sock, _):
            measured: dict[str, Any] = {}

            def phase_starts(phase: str) -> float:
                """Before each phase, the store's peak RSS from now on; between the phases,
                the first phase's peak and the RSS now, then the attackers started: how
                long to give them to get going."""
                nonlocal attacker
                if phase == "alone":
                    measured["peak_alone"] = _PeakRss(store.pid)
                    return 0.0
                measured["peak_alone"] = measured["peak_alone"].peak()
                measured["rss_before"] = _rss_kib(store.pid)
                measured["peak"] = _PeakRss(store.pid)
                attacker = subprocess.Popen(["nice", "-n", "19", *launch.module_argv(
                    "vswapctl.attack", "127.0.0.1", str(port), str(seconds + 4), token_file, json.dumps(kinds))],
                    cwd=launch.WORKDIR, stdout=subprocess.PIPE, text=True)
                measured["cpu_start"] = (_cpu_seconds(store.pid), time.monotonic())
                return 2.0

            try:
                address = Address("unix", path=sock)
                latencies, handed_back = trio.run(_good_clients, address, seconds, token, phase_starts)
                assert attacker is not None
                cpu_start, wall_start = measured["cpu_start"]
                wall = time.monotonic() - wall_start
                cpu = {"store": round((_cpu_seconds(store.pid) - cpu_start) / wall * 100),
                       "attackers": round(_cpu_seconds(attacker.pid) / wall * 100)}
                measured["out"], _ = attacker.communicate(timeout=60)
                measured["stats"] = trio.run(query, address, Stats(), 5.0, token)
                measured["rss_after"] = _rss_kib(store.pid)
                measured["peak"] = measured["peak"].peak()
                measured["alive"] = store.poll() is None
            finally:
                if attacker is not None and attacker.poll() is None:
                    attacker.kill()
                    attacker.wait()
    return _report(seconds, kinds, latencies, handed_back, cpu, measured)


def _write_token(directory: str) -> str:
    """A fresh token in a file of mode 0600 in ``directory``; its path."""
    path = os.path.join(directory, "token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(os.urandom(32).hex())
    return path


def _report(seconds: float, kinds: dict[str, int], latencies: dict[str, list[float]],
            handed_back: list[dict[str, int]], cpu: dict[str, int], measured: dict[str, Any]) -> dict[str, Any]:
    """One run's figures, as ``vswapctl attack --json`` prints them."""
    stats, peak_alone, rss_before = measured["stats"], measured["peak_alone"], measured["rss_before"]
    rss_peak, rss_after = measured["peak"], measured["rss_after"]
    return {
        "seconds": seconds,
        "hostile_connections_at_once": sum(kinds.values()),
        "hostile_kinds": kinds,
        "hostile_connections_opened": int(measured["out"].strip() or 0),
        "good_alone": _summary(latencies["pager_alone"]),
        "good_under_attack": _summary(latencies["pager_under_attack"]),
        "observer_alone": _summary(latencies["observer_alone"]),
        "observer_under_attack": _summary(latencies["observer_under_attack"]),
        "handed_back": {"clients": len(handed_back), "pages": sum(c["taken"] for c in handed_back),
                        "fewest_pages": min(c["taken"] for c in handed_back),
                        "disconnects": sum(c["disconnects"] for c in handed_back)},
        "cpu_percent_under_attack": cpu,
        "rss_kib": {"peak_alone": peak_alone, "before_attack": rss_before, "peak": rss_peak,
                    "after_attack": rss_after, "growth": max(rss_peak, rss_after) - peak_alone,
                    "growth_over_before": max(rss_peak, rss_after) - rss_before},
        "closed_by_reason": {k: stats.get(k, 0) for k in CLOSE_REASONS},
        "bytes_stored_after": stats.get("bytes_stored", 0),
        "connections": stats.get("connections", 0),
        "store_alive": measured["alive"],
    }


def main(argv: list[str]) -> int:
    """The hostile side: HOST PORT SECONDS TOKEN_FILE [KINDS as JSON]."""
    host, port, seconds, token = argv[0], int(argv[1]), float(argv[2]), auth.load_token(argv[3])
    kinds = json.loads(argv[4]) if len(argv) > 4 else KINDS
    print(trio.run(_hostile_main, host, port, seconds, kinds, token))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
