"""Fair turns between connections, on trio's fake clock (no sockets)."""

from __future__ import annotations

import trio
import trio.testing

from hoststore.fairshare import FairShare


async def test_a_light_client_never_waits_for_heavy_streams(autojump_clock: trio.testing.MockClock) -> None:
    # On the fake clock, moved by the work itself: a loaded machine's scheduling delays
    # (a 1 ms think time seen as 50 ms on CI) cannot make the light client look gone.
    fair = FairShare(quantum=512, grace=0.005)
    order: list[str] = []
    light_waits = 0

    async def heavy(name: str) -> None:
        while True:
            await fair.turn(name, 256)
            order.append(name)
            autojump_clock.jump(0.0002)  # serving 256 pages takes a while
            await trio.sleep(0)

    async def light() -> None:
        nonlocal light_waits
        for _ in range(200):
            before = fair.waits
            await fair.turn("light", 9)
            light_waits += fair.waits - before
            order.append("light")
            fair.idle("light")
            await trio.sleep(0.001)  # its next request comes a round trip later

    async with trio.open_nursery() as nursery:
        for name in ("h1", "h2", "h3"):
            nursery.start_soon(heavy, name)
        await light()
        nursery.cancel_scope.cancel()
    # The light client never waited; each heavy stream got no more than the light
    # client's pages plus a quantum (and the one turn that crossed it).
    assert order.count("light") == 200 and light_waits == 0
    for name in ("h1", "h2", "h3"):
        assert order.count(name) * 256 <= 200 * 9 + 512 + 256
    assert fair.waits > 0


async def test_a_connection_waiting_elsewhere_does_not_hold_the_others() -> None:
    """Marked idle (reading, sending, or waiting for a drain), a connection with the
    lowest virtual time no longer holds the floor."""
    fair = FairShare(quantum=64, grace=0.0)
    await fair.turn("drainer", 1)  # ready, then off waiting for something else
    fair.idle("drainer")
    with trio.fail_after(1):
        for _ in range(100):
            await fair.turn("pager", 32)


async def test_without_idle_a_stalled_connection_holds_back_only_up_to_a_quantum() -> None:
    fair = FairShare(quantum=64, grace=0.0)
    await fair.turn("stalled", 1)
    turns = 0
    with trio.move_on_after(1):
        while True:
            await fair.turn("busy", 32)
            turns += 1
    assert turns == 3  # 0, 32, 64: then more than a quantum ahead of the stalled one
    fair.forget("stalled")  # the stalled connection closes
    with trio.fail_after(1):
        await fair.turn("busy", 32)


async def test_a_client_back_from_idle_gets_no_credit() -> None:
    fair = FairShare(quantum=64, grace=0.0)
    for _ in range(10):
        await fair.turn("busy", 100)
    await fair.turn("old", 1)  # new: starts at the floor, not at 0
    fair.idle("busy")
    assert fair.floor() >= 900


async def test_a_connection_forgotten_while_it_waits_is_let_go() -> None:
    fair = FairShare(quantum=8, grace=0.0)
    await fair.turn("low", 1)
    await fair.turn("high", 100)  # now far ahead of "low"

    async def waiter() -> None:
        await fair.turn("high", 1)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            fair.forget("high")  # its connection closed while it waited
            fair.forget("low")
