"""tools/vm/vmrun.py's stall rules (pure: heartbeat lines and a fake clock; no VM)."""

from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "vm", "vmrun.py")
_spec = importlib.util.spec_from_file_location("vmrun", _PATH)
assert _spec is not None and _spec.loader is not None
vmrun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vmrun)


def beat(used: int, out: int, into: int) -> bytes:
    return (f"[  61.2] VMTEST-BEAT t=61s swap_used={used}kB pswpout={out} pswpin={into} oom_kill=0 "
            f"avail=0kB mlocked=85328kB").encode()


def test_a_heartbeat_with_nothing_in_swap_moving_is_a_stall() -> None:
    """The inproc run that stalled: the heartbeat beat every 5 s for minutes while
    735 MB sat in swap and no counter moved."""
    swap = vmrun.SwapProgress()
    swap.beat(beat(734976, 183000, 400), 0.0)
    swap.beat(beat(734976, 183713, 417), 5.0)
    for t in range(10, 250, 5):
        swap.beat(beat(734976, 183713, 417), float(t))
    assert swap.still_for(250.0) == 245.0


def test_swap_moving_or_empty_is_not_a_stall() -> None:
    """Counters that move reset the clock; so does an empty swap (before the workload
    starts, and after it ends, when the guest tears down)."""
    swap = vmrun.SwapProgress()
    assert swap.still_for(100.0) == 0.0  # no beat yet
    for t in range(0, 300, 5):
        swap.beat(beat(1000, t, t // 2), float(t))
    assert swap.still_for(300.0) == 5.0
    for t in range(300, 900, 5):
        swap.beat(beat(0, 300, 150), float(t))
    assert swap.still_for(900.0) == 0.0
    swap.beat(b"VMTEST-IO loop0=510/4928,1060/732100 cpu287=61s", 950.0)  # not a heartbeat: ignored
    assert swap.still_for(950.0) == 0.0
