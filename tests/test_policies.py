"""Admission policies: each built-in on fake pressure, plug-ins (module path, entry
point, failing), on a real store, and changed at run time by an admin only."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import trio

from pagewire.access import IN_PROCESS
from pagewire.address import Address
from pagewire.messages import PAGE_SIZE, PROTOCOL_VERSION, ROLE_PAGER, Configure, Hello, PageStatus
from hoststore.policies import DecisionContext, PolicyError, parse_policy
from hoststore.policy import Limits
from hoststore.pressure import Sampler, Snapshot
from hoststore.store import Store

S, P, POL, ERR = PageStatus.STORED, PageStatus.REFUSED_PRESSURE, PageStatus.REFUSED_POLICY, \
    PageStatus.REFUSED_POLICY_ERROR


def ctx(pages: int = 4, used: float = 10.0, psi: float | None = None, under: bool = False, first: int = 0,
        client_pages: int = 0) -> DecisionContext:
    snap = Snapshot(1 << 34, 1 << 33, used, psi)
    return DecisionContext("c", first, pages, snap, 0, 1024, client_pages, None, 1024, under)


def statuses(verdict: bytes | None, pages: int = 4) -> list[int]:
    return [S] * pages if verdict is None else list(verdict)


def test_the_built_in_policies_decide_as_their_specs_say() -> None:
    assert statuses(parse_policy("pressure").decide(ctx(under=False))) == [S] * 4
    assert statuses(parse_policy("pressure").decide(ctx(under=True))) == [P] * 4
    assert statuses(parse_policy("accept-all").decide(ctx(under=True))) == [S] * 4
    assert statuses(parse_policy("refuse-all").decide(ctx())) == [POL] * 4
    every = parse_policy("refuse-every:3")
    assert statuses(every.decide(ctx(pages=4))) + statuses(every.decide(ctx(pages=2)), 2) == [S, S, POL, S, S, POL]
    a, b = parse_policy("refuse-fraction:0.5:7"), parse_policy("refuse-fraction:0.5:7")
    run_a = [statuses(a.decide(ctx(pages=64)), 64) for _ in range(4)]
    assert run_a == [statuses(b.decide(ctx(pages=64)), 64) for _ in range(4)]  # seeded: reproducible
    refused = sum(row.count(POL) for row in run_a)
    assert 64 < refused < 192  # about half of 256


def test_psi_has_hysteresis_and_needs_the_kernel() -> None:
    psi = parse_policy("psi:20:10")
    assert statuses(psi.decide(ctx(psi=19.0))) == [S] * 4
    assert statuses(psi.decide(ctx(psi=20.0))) == [P] * 4
    assert statuses(psi.decide(ctx(psi=15.0))) == [P] * 4  # still above the low threshold
    assert statuses(psi.decide(ctx(psi=10.0))) == [S] * 4
    with pytest.raises(PolicyError, match="no /proc/pressure/memory"):
        parse_policy("psi", psi_available=lambda: False)


def test_delay_layers_on_any_policy() -> None:
    policy = parse_policy("delay:25,refuse-every:2")
    assert policy.delay == 0.025 and policy.spec == "delay:25,refuse-every:2"
    assert statuses(policy.decide(ctx())) == [S, POL, S, POL]


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("refuse-every:0", "at least 1"), ("refuse-fraction:2", "within 0..1"),
    ("refuse-every:x", "not a number"), ("delay:5", "delay:MS,SPEC"), ("delay:-1,pressure", "delay:MS,SPEC"),
    ("nosuchpolicy", "no policy"), ("no.such.module:fn", "cannot load"), ("tests.policyplugins:nothing", "cannot load"),
    ("psi:5:9", "low"),
])
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)


def test_a_plug_in_by_module_path_decides_page_by_page() -> None:
    policy = parse_policy("tests.policyplugins:take_even")
    assert statuses(policy.decide(ctx(first=10))) == [S, POL, S, POL]
    below = parse_policy("tests.policyplugins:take_while_below")
    assert statuses(below.decide(ctx(client_pages=7))) == [S] * 4
    assert statuses(below.decide(ctx(client_pages=8))) == [POL] * 4


@pytest.mark.parametrize("name", ["explode", "wrong_shape"])
def test_a_failing_plug_in_refuses_with_policy_error_and_never_raises(name: str) -> None:
    policy = parse_policy(f"tests.policyplugins:{name}")
    for _ in range(3):
        assert statuses(policy.decide(ctx())) == [ERR] * 4


def test_a_plug_in_registered_as_an_entry_point(monkeypatch) -> None:
    point = importlib.metadata.EntryPoint("even", "tests.policyplugins:take_even", "vswapfs.policies")
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        return [point] if kw.get("group") == "vswapfs.policies" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert statuses(parse_policy("even").decide(ctx())) == [S, POL, S, POL]


# -- on a store ----------------------------------------------------------------------------------


def attached(store: Store, name: str = "c"):
    hello = Hello(PROTOCOL_VERSION, name, ROLE_PAGER, 64 * PAGE_SIZE, "i", os.urandom(16))
    client, _, _ = store.attach(hello, os.urandom(16), owner=IN_PROCESS)
    store.bind(client, object())
    return client


async def put(store: Store, client, first: int, n: int, seq: int) -> list[int]:
    return list(await store.put(client, first, seq, bytes(n * PAGE_SIZE)))


async def test_a_store_counts_refusals_by_its_policy_and_its_limits_still_apply() -> None:
    level = [95.0]
    store = Store(Limits(capacity_pages=4), Sampler(0, source=lambda: Snapshot.fake(level[0])),
                  policy=parse_policy("accept-all"))
    client = attached(store)
    # accept-all ignores pressure, not capacity
    assert await put(store, client, 0, 6, 1) == [S] * 4 + [PageStatus.REFUSED_CAPACITY] * 2
    store.configure(Configure(policy="tests.policyplugins:explode"))
    assert await put(store, client, 10, 2, 2) == [ERR] * 2
    store.configure(Configure(policy="refuse-all"))
    assert await put(store, client, 0, 1, 3) == [POL]  # and the older copy of page 0 is dropped: never stale
    stats = store.stats()
    assert stats["refused_policy_error"] == 2 and stats["refused_policy"] == 1 and stats["stale_dropped"] == 1
    assert stats["policy_changes"] == 2 and stats["policy"] == "refuse-all" and store.pages == 3


def test_configure_is_all_or_nothing() -> None:
    store = Store(Limits(capacity_pages=4), Sampler(0, source=lambda: Snapshot.fake(10)))
    from hoststore.store import RequestError

    with pytest.raises(RequestError, match="no policy"):
        store.configure(Configure(policy="bogus", capacity=8 * PAGE_SIZE))
    with pytest.raises(RequestError, match="watermarks"):
        store.configure(Configure(high_percent=50, low_percent=60))
    assert store.limits.capacity_pages == 4 and store.policy.spec == "pressure"
    answer = store.configure(Configure(capacity=16 * PAGE_SIZE, quotas={"": 8 * PAGE_SIZE, "vm1": 12 * PAGE_SIZE}))
    assert answer["capacity_pages"] == 16 and answer["quota_pages"] == 8 and answer["quotas"] == {"vm1": 12}
    assert store.stats()["policy_changes"] == 1


async def test_a_delay_holds_each_put_answer_back(autojump_clock, tmp_path) -> None:
    from vswapfs.inproc import InprocStore

    store = InprocStore("c", 64 * PAGE_SIZE, Limits(capacity_pages=64),
                        Sampler(0, source=lambda: Snapshot.fake(10)))
    store.store.configure(Configure(policy="delay:250,accept-all"))
    start = trio.current_time()
    assert await store.put(0, 1, bytes(PAGE_SIZE)) == bytes(1)
    assert trio.current_time() - start >= 0.25


async def test_only_an_admin_may_change_a_running_store(tmp_path, monkeypatch) -> None:
    from pagewire import access
    from hoststore.server import Server, ServerConfig, open_listener
    from vswapfs.hostclient import query
    from vswapfs.pagestore import StoreError

    store = Store(Limits(capacity_pages=64), Sampler(0, source=lambda: Snapshot.fake(10)))
    async with trio.open_nursery() as nursery:
        listener = await open_listener(Address("unix", path=str(tmp_path / "s.sock")))
        [address] = await nursery.start(Server(store, ServerConfig()).serve, [listener])
        answer = await query(address, Configure(policy="refuse-every:4"))
        assert answer["policy"] == "refuse-every:4" and store.policy.spec == "refuse-every:4"
        with pytest.raises(StoreError, match="no policy"):
            await query(address, Configure(policy="bogus"))
        me = os.geteuid()
        monkeypatch.setattr(access.Access, "own_uids", property(lambda self: frozenset({me + 4242})))
        nursery.cancel_scope.cancel()
    store2 = Store(Limits(capacity_pages=64), Sampler(0, source=lambda: Snapshot.fake(10)))
    async with trio.open_nursery() as nursery:
        allowed = access.Access(allowed_uids=frozenset({os.geteuid()}))
        listener = await open_listener(Address("unix", path=str(tmp_path / "t.sock")), allowed)
        [address] = await nursery.start(Server(store2, ServerConfig(), access=allowed).serve, [listener])
        with pytest.raises(StoreError, match="admin"):
            await query(address, Configure(policy="refuse-all"))
        assert store2.policy.spec == "pressure" and store2.counters["policy_changes"] == 0
        nursery.cancel_scope.cancel()


def test_vswapctl_policy_and_limits_on_a_running_store() -> None:
    from vswapctl.benchstore import bench_store

    def vswapctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vswapctl", *args], capture_output=True, text=True, timeout=60)

    with bench_store("vswapctl-policytest-", "--capacity", "16M", "--policy", "refuse-every:2") as (_, sock, _dir):
        host = f"unix:{sock}"
        shown = vswapctl("policy", "--host", host)
        assert shown.returncode == 0 and "refuse-every:2" in shown.stdout, shown.stderr
        changed = vswapctl("policy", "--host", host, "--json", "tests.policyplugins:take_even")
        assert changed.returncode == 0, changed.stderr
        assert json.loads(changed.stdout)["policy"] == "tests.policyplugins:take_even"
        limits = vswapctl("limits", "--host", host, "--json", "--capacity", "8M", "--quota", "vm1=4M")
        assert limits.returncode == 0, limits.stderr
        answer = json.loads(limits.stdout)
        assert answer["capacity_pages"] == 2048 and answer["quotas"] == {"vm1": 1024}
        bad = vswapctl("policy", "--host", host, "nosuch")
        assert bad.returncode == 1 and "no policy 'nosuch'" in bad.stderr
