"""The decision trace: what it shows, that a slow reader loses only its own oldest
events (counted) and never slows the store, and that only an admin may follow it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from pagewire.access import IN_PROCESS
from pagewire.address import Address
from pagewire.messages import PAGE_SIZE, PROTOCOL_VERSION, ROLE_PAGER, Configure, Hello, TraceRead
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.store import Store
from hoststore.trace import QUEUE


def attached(store: Store, name: str = "vm1"):
    client, _, _ = store.attach(Hello(PROTOCOL_VERSION, name, ROLE_PAGER, 4096 * PAGE_SIZE, "i", os.urandom(16)),
                                os.urandom(16), owner=IN_PROCESS)
    store.bind(client, object())
    return client


def new_store() -> Store:
    return Store(Limits(capacity_pages=4), Sampler(0, source=lambda: Snapshot.fake(12.5)))


async def test_nothing_is_built_while_nobody_reads_and_a_reader_sees_each_decision() -> None:
    store = new_store()
    client = attached(store)
    await store.put(client, 0, 1, bytes(2 * PAGE_SIZE))
    assert not store.trace.active
    reader = store.trace.reader("me", 1)
    await store.put(client, 10, 2, bytes(4 * PAGE_SIZE))  # 2 fit, 2 over capacity
    store.invalidate_pages(client, [0, 1], 5)
    events, dropped = reader.take(10)
    assert dropped == 0 and [e["event"] for e in events] == ["put", "invalidate"]
    put = events[0]
    assert (put["client"], put["first"], put["pages"], put["stored"]) == ("vm1", 10, 4, 2)
    assert put["refused"] == {"capacity": 2} and put["used_percent"] == 12.5 and put["policy"] == "pressure"
    assert events[1]["pages"] == 2


async def test_a_slow_reader_loses_its_oldest_events_counted_and_the_store_goes_on() -> None:
    store = new_store()
    store.configure(Configure(policy="refuse-all"))
    client = attached(store)
    reader = store.trace.reader("slow", 1)
    sampled = store.trace.reader("sampled", 10)
    for seq in range(1, QUEUE + 101):
        await store.put(client, seq % 4000, seq, bytes(PAGE_SIZE))
    assert len(reader.events) == QUEUE  # bounded
    events, dropped = reader.take(QUEUE)
    assert dropped == 100 and len(events) == QUEUE
    assert events[0]["first"] == 101 % 4000  # the oldest went
    assert len(sampled.events) == (QUEUE + 100) // 10
    assert store.counters["refused_policy"] == QUEUE + 100  # every put was decided, read or not


async def test_following_the_trace_over_the_socket_is_for_admins_only(tmp_path, monkeypatch) -> None:
    from pagewire import access
    from hoststore.server import Server, ServerConfig, open_listener
    from vswapfs.hostclient import HostClient, query
    from vswapfs.pagestore import StoreError

    store = new_store()
    async with trio.open_nursery() as nursery:
        listener = await open_listener(Address("unix", path=str(tmp_path / "s.sock")))
        [address] = await nursery.start(Server(store, ServerConfig()).serve, [listener])
        got: list[dict] = []

        async def follow() -> None:
            from vswapfs.hostclient import follow as follow_store

            await follow_store(address, TraceRead(wait=0.2), got.append)

        nursery.start_soon(follow)
        with trio.fail_after(5):
            while not store.trace.active:
                await trio.sleep(0.01)
        client = HostClient(address, "vm1", 64 * PAGE_SIZE)
        await nursery.start(client.run)
        await client.wait_connected()
        await client.put(0, 1, os.urandom(2 * PAGE_SIZE))
        with trio.fail_after(5):
            while not any(e["event"] == "put" for answer in got for e in answer["events"]):
                await trio.sleep(0.01)
        me = os.geteuid()
        monkeypatch.setattr(access.Access, "own_uids", property(lambda self: frozenset({me + 4242})))
        allowed = access.Access(allowed_uids=frozenset({me}))
        listener2 = await open_listener(Address("unix", path=str(tmp_path / "t.sock")), allowed)
        [address2] = await nursery.start(Server(new_store(), ServerConfig(), access=allowed).serve, [listener2])
        with pytest.raises(StoreError, match="admin"):
            await query(address2, TraceRead(wait=0))
        nursery.cancel_scope.cancel()


def test_vswapctl_trace_prints_decisions_as_json_lines() -> None:
    import json
    import queue
    import threading

    from vswapctl.benchstore import bench_store

    with bench_store("vswapctl-tracetest-", "--capacity", "16M") as (_, sock, _dir):
        tracer = subprocess.Popen([sys.executable, "-m", "vswapctl", "trace", "--json", "--host", f"unix:{sock}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines: queue.Queue[str] = queue.Queue()
            assert tracer.stdout is not None
            threading.Thread(target=lambda: [lines.put(line) for line in tracer.stdout], daemon=True).start()

            async def put_until_traced() -> None:
                """Puts until the tracer, once connected and reading, shows one: it sees
                only decisions made after it began to read."""
                from vswapfs.hostclient import HostClient

                client = HostClient(Address("unix", path=sock), "vm1", 64 * PAGE_SIZE)
                async with trio.open_nursery() as nursery:
                    await nursery.start(client.run)
                    await client.wait_connected()
                    with trio.fail_after(20):
                        seq = 0
                        while lines.empty():
                            seq += 1
                            await client.put(5, seq, os.urandom(3 * PAGE_SIZE))
                            await trio.sleep(0.05)
                    await client.invalidate(0, 64, seq + 1)  # nothing left: the store's stop need not wait
                    nursery.cancel_scope.cancel()

            trio.run(put_until_traced)
            event = json.loads(lines.get(timeout=5))
            assert event["event"] == "put" and event["first"] == 5 and event["stored"] == 3
        finally:
            tracer.send_signal(2)  # ^C
            tracer.wait(10)
        assert tracer.returncode == 0
