"""About 50 hostile connections against a real hoststore process while a good
client stores and reads pages (``vswapctl attack``, on loopback).

What must hold: the store lives, the good client gets every page back intact
and is answered throughout, each kind of attack is closed for its own reason
and counted, and the store's RSS grows by less than 16 MiB.  Latency is a
benchmark figure (`vswapctl attack`, medians in the closing note); here it is
only bounded loosely, so that a noisy 2-core machine cannot fail the suite
while a store that serves attackers before its clients would.
"""

from __future__ import annotations

from vswapctl import attack


def test_a_good_client_is_served_through_an_attack_and_the_store_stays_small() -> None:
    report = attack.run(seconds=4.0)
    assert report["store_alive"]
    alone, attacked = report["good_alone"], report["good_under_attack"]
    # The good client checks every page it reads back (the harness raises otherwise).
    assert attacked["requests"] >= 100
    assert attacked["p99_ms"] <= max(10 * alone["p99_ms"], 30.0), report
    assert report["rss_kib"]["growth"] < 16 * 1024, report
    closed = report["closed_by_reason"]
    assert closed["closed_oversized_frame"] > 0  # oversized length prefixes, refused at the header
    assert closed["closed_hello_timeout"] > 0  # half-open connections and a byte a second
    assert closed["refused_connection_rate"] > 0  # connection floods
    assert closed["fair_waits"] > 0  # get floods and invalidate streams waited for the good client
    assert closed["connection_errors"] == 0  # nothing an attacker sent raised an unexpected error
