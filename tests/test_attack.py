"""About 50 hostile connections against a real hoststore process while good clients
work on its unix socket (``vswapctl attack``, on loopback).

The attackers connect from 127.0.0.2-7 (the store must count them as one host),
fill its pool of connections that have not said hello, say hellos without the
token, and, holding the token, stall puts of the largest legal size a byte short
and ask for the largest answers without reading them.

What must hold: the store lives; the good pager gets every page back intact and
is answered throughout, and the admin observer's stats are answered on fresh
connections throughout (the harness raises otherwise); four good clients that
the store hands pages back to under pressure meanwhile take pages back and are
never disconnected (the store's own hand-backs once got them closed as if they
had stalled); each kind of attack is closed for its own reason and counted; and
the store's peak RSS under attack is less than 24 MiB above its peak before it
(with the good clients alone).  The promise (docs/security.md) is 16 MiB, checked by the
benchmark (`vswapctl attack --runs 3`, December 2026: 11.8, 12.1 and 15.2 MiB);
the bound here is looser so that a noisy machine cannot fail the suite.  It still fails the old code's way of growing without
bound (212 MiB).

Latency is a benchmark figure (`vswapctl attack`, medians in docs/security.md); here
it is only bounded loosely, so that a noisy 2-core machine cannot fail the suite
while a store that serves attackers before its clients would.
"""

from __future__ import annotations

from vswapctl import attack


def test_good_clients_are_served_through_an_attack_and_the_store_stays_small() -> None:
    seconds = 4.0
    report = attack.run(seconds=seconds)
    assert report["store_alive"]
    alone, attacked = report["good_alone"], report["good_under_attack"]
    # The good clients check everything they get back (the harness raises otherwise).
    assert attacked["requests"] >= 100
    assert attacked["p99_ms"] <= max(10 * alone["p99_ms"], 30.0), report
    assert report["observer_under_attack"]["requests"] >= 2 * seconds, report
    assert report["rss_kib"]["growth"] < 24 * 1024, report
    handed_back = report["handed_back"]
    assert handed_back["clients"] == attack.HANDED_BACK_CLIENTS and handed_back["fewest_pages"] > 0, report
    assert handed_back["disconnects"] == 0, report
    closed = report["closed_by_reason"]
    assert closed["closed_oversized_frame"] > 0  # oversized length prefixes, refused at the header
    # Connections that never say hello: closed at their deadline, or for newer ones when the pool is full.
    assert closed["closed_hello_timeout"] + closed["closed_hello_pool"] > 0
    assert closed["refused_auth"] > 0  # hellos without the token
    # Connection floods are not asserted on: over their host's rate, connections not past
    # hello are let in while the hello pool has room (so a token holder on the same host
    # gets in), and three flooders seldom fill it.
    assert closed["closed_in_flight"] > 0  # stalled puts and unread answers, past --max-in-flight
    assert closed["fair_waits"] > 0  # get floods and invalidate streams waited for the good client
    assert closed["connection_errors"] == 0  # nothing an attacker sent raised an unexpected error
