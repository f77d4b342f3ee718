"""The controller's loop: sample the cgroup, ask the law, step the limit, record, restore.

Safety rules, checked before the law's word is applied:

* never below ``floor`` bytes (rounded up to a page), never above the limit
  found at the start, and no back-off above twice the cgroup's peak;
* an OOM kill in the cgroup (or, on v1 with the OOM killer off, the cgroup
  stuck under OOM) puts back the limit found and holds for ``oom_hold``
  intervals; a limit changed behind the controller's back is theirs, so the
  controller stops and leaves it;
* a probe tightens the limit the controller set last (at the start, the
  cgroup's usage: Senpai resets its limit to ``memory.current``), not the
  resident memory: after a back-off has loosened the limit above what is
  resident, probes creep back down to it, so a large back-off also waits long
  before it pushes again;
* no tighter limit while the swap areas (and, on v2, the cgroup's own
  ``memory.swap.max`` and those above it) have less free room than the step
  would push out, plus ``swap_margin``; no probe without its signal
  (``swapin-slo`` with no swap-in count holds);
* the limit is the controller's only while it is what the controller last
  wrote (or, before its first write, the one found): anything else is someone
  else's, and the controller stops and leaves it;
* on the way out (the end of ``duration``, a signal, an error) the limit found
  at the start is written back if the limit is still the controller's, inside
  ``shield`` (the command blocks its stop signals there, so that a second ^C
  cannot cut the restore short).  ``note(found, ours, pending)`` is called
  before and after every write, for :class:`offload.claim.Claim` to remember
  across a SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from . import psi
from .cgroupfs import PAGE, UNLIMITED, Cgroup, swap_free
from .law import BACK_OFF, PROBE, ProbeBackoff, Tuning

SENPAI, SWAPIN_SLO = "senpai", "swapin-slo"
CONTROLLERS = (SENPAI, SWAPIN_SLO)
TICK = 1.0  # seconds between samples: Senpai's
DEFAULT_PRESSURE_US = 10_000  # Senpai's --pressure: 10 ms of stall per interval
DEFAULT_SLO = 0.002  # Google's far memory: swap-ins under 0.2% of the working set per minute
DEFAULT_FLOOR = 100 << 20  # Senpai's --min-size
SWAP_MARGIN = 16 << 20
MIN_FLOOR = 1 << 20
OOM_HOLD_INTERVALS = 10

Reader = Callable[[], dict[str, Any] | None]


@dataclass(frozen=True)
class Settings:
    controller: str = SENPAI
    tuning: Tuning = field(default_factory=Tuning)
    pressure_us: float = DEFAULT_PRESSURE_US
    slo: float = DEFAULT_SLO
    floor: int = DEFAULT_FLOOR
    swap_margin: int = SWAP_MARGIN
    oom_hold: int = OOM_HOLD_INTERVALS

    def __post_init__(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller {self.controller!r} is not one of {', '.join(CONTROLLERS)}")
        if not 0 < self.pressure_us < float("inf") or not 0 < self.slo < float("inf"):
            raise ValueError("the pressure threshold and the SLO must be finite and above 0")
        if self.floor < MIN_FLOOR:
            raise ValueError(f"a floor below {MIN_FLOOR >> 20}M would let the workload lose its own code")


@dataclass
class Sample:
    t: float
    usage: int
    limit: int
    stall: psi.Stall
    oom_kills: int
    under_oom: bool
    limit_hits: int
    swapped: int
    swap_free: int
    swap_room: int | None
    device: dict[str, Any] | None
    workload: dict[str, Any] | None

    def swapins(self) -> int | None:
        return None if self.device is None else self.device.get("swapins")


@dataclass
class Outcome:
    reason: str  # why it stopped
    restored: bool  # the limit at the end is the one found (put back, or never changed)
    ticks: int


class Stopped(Exception):
    """The loop must end; the message says why."""


class StopRequested(Exception):
    """Raised by the command's signal handler: stop now, even inside a blocking limit write
    (v1's, while the kernel reclaims: the kernel then keeps the old limit)."""


class RecordFailed(Exception):
    """The record could not be written (a full disk, say)."""


class Controller:
    def __init__(self, cgroup: Cgroup, settings: Settings, *, device: Reader | None = None,
                 workload: Reader | None = None, record: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 swaps: str | None = None, say: Callable[[str], None] = lambda line: None,
                 device_source: str = "the vswapfs device's reads",
                 note: Callable[[str, int | None, int | None], None] = lambda found, ours, pending: None,
                 shield: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        self.cg, self.settings = cgroup, settings
        self.device, self.workload, self.out, self.say = device, workload, record, say
        self.clock, self.sleep, self.swaps = clock, sleep, swaps
        self.device_source, self.note, self.shield = device_source, note, shield
        self.found_text = cgroup.limit_text()
        self.found = cgroup.limit()
        self.floor = -(-settings.floor // PAGE) * PAGE
        self.start = clock()
        self.law = ProbeBackoff(settings.tuning, self.start)
        self.ours: int | None = None  # the limit we last wrote; None: the one found is in place
        self.pending: int | None = None  # a limit being written (a signal may end the write after it took)
        self.level: int | None = None  # where probes start from while the one found is in place
        self.theirs = False  # someone else took the limit over
        self.held_until = 0.0
        self.peak = max(cgroup.usage(), cgroup.peak() or 0)
        self.last: Sample | None = None

    # -- sampling -----------------------------------------------------------------

    def sample(self) -> Sample:
        cg = self.cg
        return Sample(self.clock() - self.start, cg.usage(), cg.limit(), cg.stall(), cg.oom_kills(),
                      cg.under_oom(), cg.limit_hits(), cg.swapped(), swap_free(self.swaps), cg.swap_room(),
                      _read(self.device), _read(self.workload))

    def _observed(self, now: Sample, before: Sample) -> tuple[float, float] | None:
        """(signal since the last sample, the budget of one interval) for the law; None
        when the signal is missing (the device did not answer)."""
        s = self.settings
        if s.controller == SENPAI:
            return (now.stall - before.stall).some_us, s.pressure_us
        ins, was = now.swapins(), before.swapins()
        if ins is None or was is None:
            return None
        working_set = max(now.usage // PAGE, 1)
        budget = max(s.slo * working_set * s.tuning.interval / 60.0, 1.0)
        return ins - was, budget

    # -- one tick -----------------------------------------------------------------

    def tick(self) -> dict[str, Any]:
        now = self.sample()
        before, self.last = self.last or now, now
        self.peak = max(self.peak, now.usage)
        if now.limit != (self.found if self.ours is None else self.ours):
            self.theirs = True
            raise Stopped(f"the limit was changed by someone else (to {now.limit}): leaving it to them")
        line: dict[str, Any] = {"kind": "tick", **_figures(now, before), "peak": self.peak}
        if now.oom_kills > before.oom_kills or now.under_oom:
            self._put_back()
            self.held_until = now.t + self.settings.oom_hold * self.settings.tuning.interval
            self.law = ProbeBackoff(self.settings.tuning, now.t + self.start)
            line.update(action="oom: limit restored" + (" (the cgroup was stuck under OOM)" if now.under_oom
                                                        else ""), factor=0.0)
            return self._emit(line)
        signal = self._observed(now, before)
        if signal is None:
            line.update(action="hold (no swap-in count from the device)", factor=0.0)
            return self._emit(line)
        decision = self.law.tick(now.t + self.start, *signal)
        line.update(observed=decision.observed, budget=decision.budget, factor=decision.factor)
        line["action"] = self._apply(decision.action, decision.factor, now)
        return self._emit(line)

    def _apply(self, action: str, factor: float, now: Sample) -> str:
        s = self.settings
        current = self.ours if self.ours is not None else self.level or min(now.limit, now.usage)
        # Twice the peak holds nothing back (the workload can double before it meets the
        # limit, and its peak grows with it); a higher limit would only make the probes
        # creep down longer before they push again.
        ceiling = min(self.found, 2 * max(self.peak, now.usage))
        if action == BACK_OFF:
            if self.ours is None:
                return "back off (no limit of ours)"
            target = min(-(-int(current * (1 + factor)) // PAGE) * PAGE, max(ceiling, current))
            if target >= self.found:
                self._put_back()
                self.level = self.found  # probes creep down from there, as from any loosened limit
                return "back off: limit found restored"
            return self._write(target, "back off")
        if action != PROBE:
            return action
        if now.t < self.held_until:
            return "hold (after an OOM kill)"
        target = max(int(min(current, ceiling) * (1 + factor)) // PAGE * PAGE, self.floor)
        if target >= current:
            return "at the floor"
        room = now.swap_free if now.swap_room is None else min(now.swap_free, now.swap_room)
        if room < max(now.usage - target, 0) + s.swap_margin:
            return "hold (swap is full)"
        return self._write(target, "probe")

    def _write(self, target: int, action: str) -> str:
        self.note(self.found_text, self.ours, target)  # first: a SIGKILL mid-write leaves either in place
        self.pending = target
        written = self.cg.set_limit(target)
        self.pending = None
        self.ours = self.cg.limit() if written or self.ours is not None else None
        if self.ours == self.found:
            self.ours, self.level = None, self.found
        self.note(self.found_text, self.ours, None)
        if written:
            return action
        # v1: the kernel could not reclaim that far (EBUSY) and kept the old limit.
        return f"{action}: the kernel could not reclaim to {target}"

    def _put_back(self) -> None:
        """The limit found, in place again (after an OOM kill, a full back-off, the end)."""
        self.level = None
        if self.ours is not None:
            self.cg.set_limit(self.found_text)
            self.ours = None
            self.note(self.found_text, None, None)

    def _emit(self, line: dict[str, Any]) -> dict[str, Any]:
        if self.out is not None:
            try:
                self.out.write(json.dumps(line) + "\n")
                self.out.flush()
            except OSError as exc:
                raise RecordFailed(f"the record could not be written: {exc}") from None
        return line

    # -- the loop -----------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        s = self.settings
        return {"kind": "start", "cgroup": self.cg.path, "version": self.cg.version,
                "controller": s.controller, "tuning": asdict(s.tuning), "pressure_us": s.pressure_us,
                "slo": s.slo, "floor": s.floor, "limit_found": self.found_text, "usage": self.cg.usage(),
                "peak": self.peak, "signals": self.signals()}

    def signals(self) -> dict[str, str]:
        sig = self.cg.signals()
        sig["swapins"] = self.device_source if self.device else "none"
        sig["workload"] = "its metric file" if self.workload else "none"
        return sig

    def run(self, duration: float | None = None, stop: Callable[[], bool] = lambda: False) -> Outcome:
        """Tick every second until ``duration`` has passed or ``stop()`` is true; the
        limit found at the start is put back unless someone else took the limit over."""
        ticks, reason = 0, "stopped"
        try:
            self._emit(self.header())
            while not stop():
                if duration is not None and self.clock() - self.start >= duration:
                    reason = "duration reached"
                    break
                line = self.tick()
                ticks += 1
                self.say(_progress(line))
                self.sleep(TICK)
        except (Stopped, RecordFailed, StopRequested) as exc:
            reason = str(exc) or type(exc).__name__
        except OSError as exc:  # the cgroup went away (its workload ended and it was removed), say
            reason = f"the cgroup's files failed: {exc}"
        finally:
            restored = self._finish_shielded(reason)
        return Outcome(reason, restored, ticks)

    def _finish_shielded(self, reason: str) -> bool:
        """:meth:`_finish` with the stop signals held; a stop that lands before they are
        held only starts it again."""
        while True:
            try:
                with self.shield():
                    return self._finish(reason)
            except StopRequested:
                continue

    def _finish(self, reason: str) -> bool:
        """Put the limit found back if it is still ours; whether the limit found is in place."""
        restored = False
        if not self.theirs:
            try:
                # Ours: the limit last written, or one being written when a signal ended
                # the write after the kernel took it (v2 sets memory.high, then reclaims).
                if self.cg.limit() in {self.ours, self.pending} - {None}:
                    self.cg.set_limit(self.found_text)
                    self.ours = self.pending = None
                    self.note(self.found_text, None, None)
                restored = self.cg.limit() == self.found
            except OSError:
                restored = False
        end: dict[str, Any] = {"kind": "end", "reason": reason, "restored": restored, "peak": self.peak}
        try:
            end.update(limit=self.cg.limit_text(), usage=self.cg.usage())
        except OSError:
            pass
        try:
            self._emit(end)
        except RecordFailed:
            pass
        return restored


def _figures(now: Sample, before: Sample) -> dict[str, Any]:
    stall = now.stall - before.stall
    out: dict[str, Any] = {
        "t": round(now.t, 3), "usage": now.usage, "limit": None if now.limit >= UNLIMITED else now.limit,
        "some_us": stall.some_us, "full_us": stall.full_us, "swapped": now.swapped, "swap_free": now.swap_free,
        "oom_kills": now.oom_kills, "limit_hits": now.limit_hits - before.limit_hits,
    }
    ins, was = now.swapins(), before.swapins()
    if ins is not None and was is not None:
        out["swapins"] = ins - was
    if now.device is not None:
        out["device"] = now.device
    if now.workload is not None:
        out["workload"] = now.workload
    return out


def _read(reader: Reader | None) -> dict[str, Any] | None:
    """A reader's figures; None when it has none now (the workload has not written its
    file yet, the device's control socket did not answer)."""
    if reader is None:
        return None
    try:
        return reader()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _progress(line: dict[str, Any]) -> str:
    limit = "none" if line.get("limit") is None else f"{line['limit'] >> 20}M"
    ins = f" swapins {line['swapins']}" if "swapins" in line else ""
    return (f"t={line['t']:7.1f}s usage {line['usage'] >> 20}M limit {limit} peak {line['peak'] >> 20}M "
            f"stall {line['some_us'] / 1000:.1f}ms{ins} -> {line['action']}")
