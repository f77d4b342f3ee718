"""Admission policies a store can run, chosen by a SPEC at start (``--policy``) or at
run time (``vswapctl policy SPEC``).

A policy looks at one ``put`` batch (a read-only :class:`DecisionContext`) and
says, page by page, whether it would take the page; the store's limits
(capacity, quota, weighted share, draining) still apply to the pages it
takes.  A refusal carries a reason the client counts.

SPEC, one of:

* ``pressure`` (default): memory pressure with a high and a low watermark
  (the store's ``--high-watermark`` / ``--low-watermark``), hysteresis between;
* ``psi[:HIGH[:LOW]]``: the same on /proc/pressure/memory ``some avg10`` (%,
  default 10 and 5), where the kernel has PSI;
* ``accept-all``, ``refuse-all``;
* ``refuse-fraction:P[:SEED]``: refuse each page with probability P, from a
  seeded generator (default seed 0): the same pages on every run;
* ``refuse-every:N``: refuse every Nth page offered;
* ``MODULE:CALLABLE`` or a name registered under the ``vswapfs.policies``
  entry-point group: a plug-in, called with the context, returning True
  (take all), False (refuse all) or one bool per page.  A plug-in that raises
  or answers anything else refuses the batch with reason ``policy_error``;
  it never takes the store down;
* ``delay:MS,SPEC``: SPEC, with every put answer held back MS milliseconds
  (a slow or distant host).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagewire.messages import PageStatus
from .pressure import Snapshot

log = logging.getLogger("hoststore")

ENTRY_POINT_GROUP = "vswapfs.policies"
MAX_DELAY_MS = 60_000


class PolicyError(ValueError):
    """A SPEC that names no policy, or a policy that cannot run here."""


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What a policy may look at (read-only): one put batch and the store around it."""

    client: str  # the client's name
    first: int  # first page of the batch
    pages: int  # how many pages
    pressure: Snapshot  # the machine's memory now (used_percent, psi_some_avg10, total, available)
    store_pages: int  # pages the store holds, all clients
    capacity_pages: int
    client_pages: int  # pages this client holds
    quota_pages: int | None  # this client's quota (None: none)
    share_pages: int  # this client's weighted share of the capacity
    under_pressure: bool  # the store's watermark state (high/low hysteresis on used_percent)


# What ``decide`` returns: None (take every page) or one status byte per page
# (PageStatus.STORED where it would take the page).
Verdict = bytes | None


class Policy:
    spec = ""
    delay = 0.0  # seconds each put answer is held back

    def decide(self, ctx: DecisionContext) -> Verdict:
        raise NotImplementedError


class Pressure(Policy):
    """The store's watermarks with hysteresis (``hoststore.policy.under_pressure``)."""

    spec = "pressure"

    def decide(self, ctx: DecisionContext) -> Verdict:
        return bytes([PageStatus.REFUSED_PRESSURE]) * ctx.pages if ctx.under_pressure else None


class Psi(Policy):
    def __init__(self, high: float, low: float) -> None:
        if not 0 <= low <= high <= 100:
            raise PolicyError(f"psi thresholds need 0 <= low ({low}) <= high ({high}) <= 100")
        self.high, self.low = high, low
        self.spec = f"psi:{high:g}:{low:g}"
        self.under = False

    def decide(self, ctx: DecisionContext) -> Verdict:
        some = ctx.pressure.psi_some_avg10
        if some is None:  # PSI went away (checked at choice time): count it as no pressure
            return None
        self.under = some > self.low if self.under else some >= self.high
        return bytes([PageStatus.REFUSED_PRESSURE]) * ctx.pages if self.under else None


class Fixed(Policy):
    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.spec = "accept-all" if accept else "refuse-all"

    def decide(self, ctx: DecisionContext) -> Verdict:
        return None if self.accept else bytes([PageStatus.REFUSED_POLICY]) * ctx.pages


class RefuseFraction(Policy):
    def __init__(self, fraction: float, seed: int) -> None:
        if not 0 <= fraction <= 1:
            raise PolicyError(f"refuse-fraction {fraction} is not within 0..1")
        self.fraction, self.seed = fraction, seed
        self.spec = f"refuse-fraction:{fraction:g}:{seed}"
        self._rng = random.Random(seed)

    def decide(self, ctx: DecisionContext) -> Verdict:
        rng, p = self._rng, self.fraction
        return bytes(PageStatus.REFUSED_POLICY if rng.random() < p else PageStatus.STORED for _ in range(ctx.pages))


class RefuseEvery(Policy):
    def __init__(self, every: int) -> None:
        if every < 1:
            raise PolicyError(f"refuse-every {every} is not at least 1")
        self.every = every
        self.spec = f"refuse-every:{every}"
        self._offered = 0

    def decide(self, ctx: DecisionContext) -> Verdict:
        out = bytearray(ctx.pages)
        for i in range(ctx.pages):
            self._offered += 1
            if self._offered % self.every == 0:
                out[i] = PageStatus.REFUSED_POLICY
        return bytes(out)


class PlugIn(Policy):
    """A callable of someone else's: whatever it does, the store goes on."""

    def __init__(self, spec: str, fn: Callable[[DecisionContext], Any]) -> None:
        self.spec = spec
        self.fn = fn
        self.errors = 0

    def decide(self, ctx: DecisionContext) -> Verdict:
        try:
            answer = self.fn(ctx)
            if answer is True:
                return None
            if answer is False:
                return bytes([PageStatus.REFUSED_POLICY]) * ctx.pages
            if isinstance(answer, Sequence) and not isinstance(answer, str | bytes) and len(answer) == ctx.pages \
                    and all(isinstance(a, bool) for a in answer):
                return bytes(PageStatus.STORED if a else PageStatus.REFUSED_POLICY for a in answer)
            raise TypeError(f"answered {type(answer).__name__}, not True, False or {ctx.pages} bools")
        except Exception as exc:  # noqa: BLE001 - a plug-in's failure refuses, and nothing else
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.error("policy %s failed (%d time(s)); refusing its batches with reason policy_error: %s",
                          self.spec, self.errors, exc)
            return bytes([PageStatus.REFUSED_POLICY_ERROR]) * ctx.pages


def _number(text: str, what: str, kind: Callable[[str], Any] = float) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise PolicyError(f"{what} {text!r} is not a number") from None


def _load(spec: str) -> Callable[[DecisionContext], Any]:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except Exception as exc:  # noqa: BLE001 - any import failure is a bad SPEC
            raise PolicyError(f"cannot load policy {spec!r}: {exc}") from None
    else:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        if not found:
            raise PolicyError(f"no policy {spec!r}: not a built-in (pressure, psi, accept-all, refuse-all, "
                              f"refuse-fraction:P, refuse-every:N, delay:MS,SPEC), MODULE:CALLABLE, or a name "
                              f"under the {ENTRY_POINT_GROUP} entry points")
        try:
            target = found[0].load()
        except Exception as exc:  # noqa: BLE001
            raise PolicyError(f"cannot load policy {spec!r}: {exc}") from None
    if not callable(target):
        raise PolicyError(f"policy {spec!r} is not callable")
    return target


def parse_policy(spec: str, psi_available: Callable[[], bool] | None = None) -> Policy:
    """The policy a SPEC names; PolicyError says what is wrong with it."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if name == "delay":
        ms_text, comma, inner = rest.partition(",")
        ms = _number(ms_text, "delay")
        if not comma or not 0 <= ms <= MAX_DELAY_MS:
            raise PolicyError(f"delay needs delay:MS,SPEC with MS in 0..{MAX_DELAY_MS}")
        policy = parse_policy(inner, psi_available)
        policy.delay = ms / 1000
        policy.spec = f"delay:{ms:g},{policy.spec}"
        return policy
    if spec == "pressure":
        return Pressure()
    if spec in ("accept-all", "refuse-all"):
        return Fixed(spec == "accept-all")
    if name == "psi":
        if psi_available is not None and not psi_available():
            raise PolicyError("psi: this kernel has no /proc/pressure/memory")
        parts = rest.split(":") if rest else []
        high = _number(parts[0], "psi high") if parts else 10.0
        low = _number(parts[1], "psi low") if len(parts) > 1 else min(5.0, high)
        return Psi(high, low)
    if name == "refuse-fraction":
        fraction_text, _, seed_text = rest.partition(":")
        return RefuseFraction(_number(fraction_text, "fraction"), _number(seed_text or "0", "seed", int))
    if name == "refuse-every":
        return RefuseEvery(_number(rest, "refuse-every", int))
    if not spec:
        raise PolicyError("empty policy")
    return PlugIn(spec, _load(spec))
