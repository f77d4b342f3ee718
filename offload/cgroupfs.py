"""The files of one memory cgroup, v1 or v2, as the controller needs them.

=================  =========================  ===============================
what               cgroup v1                  cgroup v2
=================  =========================  ===============================
memory in use      memory.usage_in_bytes      memory.current
the limit stepped  memory.limit_in_bytes      memory.high
stall (pressure)   /proc/pressure/memory      memory.pressure (the cgroup's)
                   (machine-wide)
OOM kills          memory.oom_control         memory.events ``oom_kill``
                   ``oom_kill``
limit hits         memory.failcnt             memory.events ``high``
swapped out        memory.stat ``swap``       memory.swap.current
=================  =========================  ===============================

On v1 the stepped limit is the hard one: writing it below the usage makes the
kernel reclaim at once (into swap), and the write fails with EBUSY when it
cannot; ``set_limit`` says so instead of raising.  v1's soft limit only acts
under machine-wide pressure, which is not what a proactive controller waits for.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import psi

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"
SWAPS = "/proc/swaps"
UNLIMITED = 1 << 62  # "max" on v2; v1 reports a page-rounded 2**63-1
PAGE = os.sysconf("SC_PAGE_SIZE")
PROC_CGROUP = "/proc/self/cgroup"


class CgroupError(Exception):
    """The cgroup cannot be controlled; the message says why."""


@dataclass(frozen=True)
class Layout:
    version: int
    usage: str
    limit: str
    events: str
    swap: str
    peak: str


V1 = Layout(1, "memory.usage_in_bytes", "memory.limit_in_bytes", "memory.oom_control", "memory.stat",
            "memory.max_usage_in_bytes")
V2 = Layout(2, "memory.current", "memory.high", "memory.events", "memory.swap.current", "memory.peak")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _bytes(text: str) -> int:
    text = text.strip()
    return UNLIMITED if text == "max" else min(int(text), UNLIMITED)


class Cgroup:
    """One memory cgroup's files; every path is inside ``path`` except v1's pressure."""

    def __init__(self, path: str, layout: Layout, machine_pressure: str = psi.MACHINE_MEMORY,
                 root: str | None = None) -> None:
        self.path = path
        self.root = root or os.path.dirname(path)  # the hierarchy's root: /proc/PID/cgroup paths start there
        self.layout = layout
        self.version = layout.version
        if layout.version == 2:
            self.pressure_path, self.pressure_scope = self._file("memory.pressure"), "cgroup"
        else:
            self.pressure_path, self.pressure_scope = machine_pressure, "machine"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def usage(self) -> int:
        return _bytes(_read(self._file(self.layout.usage)))

    def limit_text(self) -> str:
        """The limit as the file holds it, to write back unchanged when the controller stops."""
        return _read(self._file(self.layout.limit)).strip()

    def limit(self) -> int:
        return _bytes(self.limit_text())

    def set_limit(self, value: int | str) -> bool:
        """Write the limit; False if the kernel could not reclaim down to it (v1's EBUSY:
        the limit is then left as it was)."""
        text = str(value) if isinstance(value, str) else str(max(PAGE, value - value % PAGE))
        fd = os.open(self._file(self.layout.limit), os.O_WRONLY | os.O_TRUNC)  # as a shell's echo >
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
        finally:
            os.close(fd)
        return True

    def oom_kills(self) -> int:
        return _keyed(_read(self._file(self.layout.events))).get("oom_kill", 0)

    def under_oom(self) -> bool:
        """v1 with the OOM killer disabled (``oom_kill_disable 1``): the workload is stuck
        at the limit, waiting for memory, instead of being killed.  v2's memory.high never
        stops a task that way."""
        if self.version != 1:
            return False
        return bool(_keyed(_read(self._file(self.layout.events))).get("under_oom", 0))

    def limit_hits(self) -> int:
        if self.version == 1:
            return int(_read(self._file("memory.failcnt")))
        return _keyed(_read(self._file("memory.events"))).get("high", 0)

    def swapped(self) -> int:
        """Bytes of this cgroup's memory now in swap."""
        if self.version == 1:
            return _keyed(_read(self._file("memory.stat"))).get("swap", 0)
        try:
            return _bytes(_read(self._file(self.layout.swap)))
        except FileNotFoundError:
            return 0

    def peak(self) -> int | None:
        try:
            return _bytes(_read(self._file(self.layout.peak)))
        except FileNotFoundError:
            return None

    def stall(self) -> psi.Stall:
        return psi.read(self.pressure_path)

    def no_swap_reason(self, swaps: str | None = None) -> str | None:
        """Why this cgroup's memory has nowhere to go, or None."""
        if swap_free(swaps) <= 0:
            return "no swap is on (or every swap area is full): the cgroup's memory has nowhere to go"
        if self.version == 1:
            try:
                if int(_read(self._file("memory.swappiness"))) == 0:
                    return f"{self.path} has memory.swappiness 0: the kernel will not swap its memory"
            except FileNotFoundError:
                pass
        elif self.swap_room() == 0:
            return f"{self.path} (or a cgroup above it) may not swap: memory.swap.max is reached or 0"
        return None

    def swap_room(self) -> int | None:
        """v2: bytes this cgroup may still put in swap, the tightest ``memory.swap.max``
        of it and the cgroups above it less what each has swapped; None where no
        such limit applies (v1's memory+swap limit does not bound swapping out)."""
        if self.version == 1:
            return None
        room = None
        path = self.path
        while os.path.exists(os.path.join(path, "memory.swap.max")):
            try:
                limit = _bytes(_read(os.path.join(path, "memory.swap.max")))
                used = _bytes(_read(os.path.join(path, "memory.swap.current")))
            except (FileNotFoundError, ValueError):
                break
            if limit < UNLIMITED:
                room = max(limit - used, 0) if room is None else min(room, max(limit - used, 0))
            path = os.path.dirname(path)
        return room

    def holds(self, proc_cgroup: str | None = None) -> bool:
        """Whether the calling process is in this cgroup or one below it (a controller
        there would squeeze its own memory, and could be the one an OOM kill takes)."""
        try:
            text = _read(proc_cgroup or PROC_CGROUP)
        except OSError:
            return False
        target = os.path.realpath(self.path)
        for line in text.splitlines():
            _, controllers, rel = line.split(":", 2)
            if (self.version == 1 and "memory" in controllers.split(",")) or (self.version == 2 and controllers == ""):
                mine = os.path.realpath(os.path.join(self.root, rel.lstrip("/")))
                return mine == target or mine.startswith(target + "/")
        return False

    def missing_signals(self) -> list[str]:
        """Signals this kernel does not give: checked once, before the controller starts."""
        missing = []
        try:
            self.stall()
        except (OSError, ValueError) as exc:
            missing.append(f"pressure: {self.pressure_path} cannot be read ({exc}): PSI is off or absent")
        try:
            events = _keyed(_read(self._file(self.layout.events)))
            if "oom_kill" not in events:
                missing.append(f"oom kills: {self._file(self.layout.events)} has no oom_kill "
                               "(a kernel before 4.13): OOM kills go unseen")
        except OSError as exc:
            missing.append(f"oom kills: {exc}")
        return missing

    def signals(self) -> dict[str, str]:
        """Which file gives each signal, for the controller to say what it watches."""
        scope = "the cgroup's own" if self.pressure_scope == "cgroup" else "machine-wide (cgroup v1 has none per cgroup)"
        return {
            "limit": self._file(self.layout.limit),
            "usage": self._file(self.layout.usage),
            "pressure": f"{self.pressure_path} ({scope})",
            "oom": self._file(self.layout.events),
            "limit_hits": self._file("memory.failcnt" if self.version == 1 else "memory.events"),
        }


def swap_free(swaps: str | None = None) -> int:
    """Bytes free in every swap area that is on."""
    free = 0
    for line in _read(swaps or SWAPS).splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            free += (int(fields[2]) - int(fields[3])) * 1024
    return free


def resolve(name: str, v1_root: str = V1_ROOT, v2_root: str = V2_ROOT,
            machine_pressure: str = psi.MACHINE_MEMORY) -> Cgroup:
    """The cgroup ``name``: a directory's path, or a path relative to the memory
    hierarchy's root (v1's, then v2's).  Never a hierarchy's root itself."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(v1_root, name), os.path.join(v2_root, name)]
    roots = {os.path.realpath(v1_root): v1_root, os.path.realpath(v2_root): v2_root}
    for path in candidates:
        if not os.path.isdir(path):
            continue
        if os.path.realpath(path) in roots:
            raise CgroupError(f"{path} is a hierarchy's root: it has no limit to step")
        for layout in (V2, V1):
            if os.path.exists(os.path.join(path, layout.usage)) and os.path.exists(os.path.join(path, layout.limit)):
                real = os.path.realpath(path)
                root = next((r for r in roots if real.startswith(r + "/")), None)
                return Cgroup(path, layout, machine_pressure, root)
        raise CgroupError(f"{path} is not a memory cgroup (no memory.current/memory.high "
                          "nor memory.usage_in_bytes/memory.limit_in_bytes)")
    raise CgroupError(f"no cgroup {name!r}: looked for " + " and ".join(candidates))
