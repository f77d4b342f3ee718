"""``vswapctl faults``: inject faults into a running store and account for every page.

On a mounted vswapfs file (never live swap, where a lost page is a process's),
each round writes random runs of pages with fresh contents, injects one fault
into the store, then reads every page back with O_DIRECT and sorts it: intact,
lost (EIO), or wrong.  A fault may lose pages only where the design says it does (a store
killed with SIGKILL in write-back mode loses exactly the pages that lived only
in it); wrong pages must always be 0.

Faults: ``sigkill`` (then a new store), ``sigstop`` (writes go on meanwhile,
then SIGCONT), ``sigterm`` (the store drains, then a new store), ``garbage``
(hostile connections: a poison hello, junk, an impossible length).
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .mounted import MountedDevice, wait_for

PAGE = 4096
FAULTS = ("sigkill", "sigstop", "sigterm", "garbage")
WRITE_TIMEOUT = 0.5


@dataclass
class Round:
    mode: str
    fault: str
    pages_written: int
    pages_verified: int
    pages_lost: int
    expected_lost: int
    wrong_pages: int
    slowest_write_during_fault: float

    @property
    def as_expected(self) -> bool:
        return self.wrong_pages == 0 and self.pages_lost == self.expected_lost


def pattern(page: int, version: int) -> bytes:
    """Names its page and version; never same-filled (its last word differs), so that
    it travels to the store or the backing file like real data."""
    return struct.pack("<QQ", page, version) * (PAGE // 16 - 1) + struct.pack("<QQ", ~page & (2**64 - 1), 1)


class Device:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, 64 * PAGE)

    def write(self, first: int, versions: list[int]) -> float:
        n = len(versions)
        self.buf[: n * PAGE] = b"".join(pattern(first + i, v) for i, v in enumerate(versions))
        start = time.monotonic()
        os.pwrite(self.fd, memoryview(self.buf)[: n * PAGE], first * PAGE)
        return time.monotonic() - start

    def read(self, page: int) -> bytes | None:
        view = memoryview(self.buf)[:PAGE]
        try:
            os.preadv(self.fd, [view], page * PAGE)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return None
        return bytes(view)

    def close(self) -> None:
        os.close(self.fd)


class Campaign:
    def __init__(self, device: MountedDevice, dev: Device, npages: int, mode: str, rng: random.Random) -> None:
        self.d = device
        self.dev = dev
        self.npages = npages
        self.mode = mode
        self.rng = rng
        self.truth: dict[int, int] = {}
        self.version = 0

    def write_random(self, pages: int) -> tuple[int, float]:
        written, slowest = 0, 0.0
        while written < pages:
            n = self.rng.randint(1, 64)
            first = self.rng.randrange(self.npages - n)
            self.version += 1
            slowest = max(slowest, self.dev.write(first, [self.version] * n))
            self.truth.update({first + i: self.version for i in range(n)})
            written += n
        return written, slowest

    def restart_store(self) -> None:
        self.d.start_hoststore()
        self.d.wait_host_connected(30)

    def inject(self, fault: str) -> tuple[int, float]:
        """Inject a fault; (pages it may lose, the slowest write during it)."""
        d = self.d
        if fault == "sigkill":
            expected = d.stats()["pages_host"]  # write-through keeps none only there
            before = d.stats()["link_sessions_lost"]
            d.signal_hoststore(signal.SIGKILL)
            d.hoststore.wait(10)  # type: ignore[union-attr]
            self.restart_store()
            wait_for(lambda: d.stats()["link_sessions_lost"] > before, 10, "vswapfs hearing of the loss")
            return expected, 0.0
        if fault == "sigstop":
            d.signal_hoststore(signal.SIGSTOP)
            try:
                _, slowest = self.write_random(256)
            finally:
                d.signal_hoststore(signal.SIGCONT)
            return 0, slowest
        if fault == "sigterm":
            d.signal_hoststore(signal.SIGTERM)
            d.hoststore.wait(60)  # type: ignore[union-attr]
            self.restart_store()
            return 0, 0.0
        if fault == "garbage":
            hostile(d.socket)
            return 0, 0.0
        raise ValueError(fault)

    def verify(self) -> tuple[int, int, int]:
        """(pages verified, pages lost, wrong pages); lost pages are rewritten."""
        lost: list[int] = []
        wrong = 0
        for page in range(self.npages):
            got = self.dev.read(page)
            if got is None:
                lost.append(page)
            elif got != (pattern(page, self.truth[page]) if page in self.truth else bytes(PAGE)):
                wrong += 1
        for page in lost:  # a rewrite makes a lost page good again
            self.version += 1
            self.dev.write(page, [self.version])
            self.truth[page] = self.version
        return self.npages, len(lost), wrong

    def round(self, fault: str) -> Round:
        written, _ = self.write_random(self.npages // 2)
        expected, slowest = self.inject(fault)
        if self.mode == "writethrough":
            expected = 0
        verified, lost, wrong = self.verify()
        return Round(self.mode, fault, written, verified, lost, expected, wrong, round(slowest, 3))


def hostile(path: str) -> None:
    """Connections no store may fall for: a poison hello, junk, an impossible length."""
    import msgpack

    poison = {"version": 2, "client": "evil", "role": "pager", "device_size": 1 << 62, "instance": "x",
              "nonce": b"n" * 16}
    body = msgpack.packb([0, 0, "hello", poison], use_bin_type=True)
    for data in (struct.pack(">I", len(body)) + body, b"\xff" * 1024, struct.pack(">I", 5) + b"\xc1" * 5):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(data)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass


def run(rounds: int, npages: int, modes: list[str], seed: int, say: Callable[[str], None]) -> list[Round]:
    base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
    results: list[Round] = []
    rng = random.Random(seed)
    for mode in modes:
        workdir = tempfile.mkdtemp(prefix="vswapctl-faults-", dir=base)
        extra = ["--write-timeout", str(WRITE_TIMEOUT)] + (["--writethrough"] if mode == "writethrough" else [])
        d = MountedDevice(workdir, capacity=f"{npages // 4 * 4}K", size=f"{npages * 4}K", extra_vswapfs=extra)
        dev = None
        try:
            d.start()
            d.wait_host_connected()
            dev = Device(d.swapfile)
            campaign = Campaign(d, dev, npages, mode, rng)
            for i in range(rounds):
                fault = FAULTS[i % len(FAULTS)]
                result = campaign.round(fault)
                results.append(result)
                say(f"{mode:<12} {fault:<8} verified {result.pages_verified}, lost {result.pages_lost} "
                    f"(expected {result.expected_lost}), wrong {result.wrong_pages}")
        finally:
            if dev is not None:
                dev.close()
            d.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def summary(results: list[Round]) -> dict[str, object]:
    return {
        "rounds": [asdict(r) | {"as_expected": r.as_expected} for r in results],
        "pages_verified": sum(r.pages_verified for r in results),
        "faults_injected": len(results),
        "pages_lost": sum(r.pages_lost for r in results),
        "pages_lost_expected": sum(r.expected_lost for r in results),
        "all_losses_expected": all(r.pages_lost == r.expected_lost for r in results),
        "wrong_pages": sum(r.wrong_pages for r in results),
    }
