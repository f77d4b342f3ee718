"""Counters and refusal causes are defined once, and docs/counters.md is what the definitions say."""

from __future__ import annotations

from fscache.counters import CacheCounter
from hoststore.hostcounters import HANDBACK_COUNTER, REFUSAL_COUNTER, HostCounter
from hoststore.tiercounters import TierCounter
from pagewire.causes import REFUSAL_CAUSES, REFUSALS, HandBackCause, PageStatus
from vswapctl import counterdoc
from vswapfs.linkcounters import LinkCounter
from vswapfs.pagercounters import REFUSAL_COUNTER as PAGER_REFUSAL_COUNTER
from vswapfs.pagercounters import PagerCounter


def test_the_document_is_what_the_definitions_say() -> None:
    assert counterdoc.DOC.read_text() == counterdoc.render(), (
        "docs/counters.md differs from the definitions: run python -m vswapctl.counterdoc --write")


def test_every_counter_is_described_and_in_the_document() -> None:
    text = counterdoc.DOC.read_text()
    for counters in (PagerCounter, LinkCounter, HostCounter, TierCounter, CacheCounter):
        for c in counters:
            assert c.description.strip(), c
            assert f"| `{c.value}` | {c.unit.value} |" in text, c


def test_each_refusal_cause_gives_a_status_and_a_counter_on_both_sides() -> None:
    assert len(REFUSALS) == len(REFUSAL_CAUSES)
    codes = [int(s) for s in PageStatus]
    assert len(codes) == len(set(codes)) == len(REFUSAL_CAUSES) + 2  # and STORED, MISSING
    for status in REFUSALS:
        assert REFUSAL_COUNTER[status].value == PAGER_REFUSAL_COUNTER[status].value == status.name.lower()
        assert REFUSAL_COUNTER[status].reason == status.name.lower().removeprefix("refused_")
    assert set(HANDBACK_COUNTER) == set(HandBackCause)


def test_every_store_counter_is_reported(tmp_path) -> None:
    from hoststore.policy import Limits
    from hoststore.pressure import Sampler, Snapshot
    from hoststore.store import Store

    store = Store(Limits(capacity_pages=16), Sampler(source=lambda: Snapshot.fake(10.0)))
    stats = store.stats(admin=True)
    assert {c.value for c in HostCounter} <= set(stats)
    # and everything else it reports is described as state
    optional = {"tier", "compression"}  # a store with --tier, with --compress
    assert set(stats) - {c.value for c in HostCounter} - optional == set(counterdoc.STORE_STATE) - optional
    from pagewire.codec import Codec

    stats = Store(Limits(capacity_pages=16), Sampler(source=lambda: Snapshot.fake(10.0)), compress=Codec.LZ4).stats(admin=True)
    assert set(stats) - {c.value for c in HostCounter} - {"tier"} == set(counterdoc.STORE_STATE) - {"tier"}


def test_every_cache_figure_is_described() -> None:
    from fscache.cachestats import StoreFigures
    from fscache.pagecache import PageCache
    from pagewire.messages import POOL_EPHEMERAL

    from .fakestore import FakeStore

    store = FakeStore(8, pool=POOL_EPHEMERAL)
    stats = PageCache(store, 8).stats()
    stats.update(StoreFigures(store).latest)  # type: ignore[arg-type]
    assert set(stats) - {c.value for c in CacheCounter} == set(counterdoc.CACHE_STATE)
