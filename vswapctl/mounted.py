"""A hoststore and a mounted vswapfs as child processes, without swap: the file
level, where faults can be injected without hurting anyone (HAZARDS.md).

Used by ``vswapctl faults`` (tools/faults.sh) and by the test suite.  Teardown
follows the one rule: nothing that serves a page listed in /proc/swaps is
stopped, unmounted or detached.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from . import system

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StillSwappedOn(Exception):
    """Teardown stopped: the device still serves swap pages (swapoff failed)."""


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.02)


@dataclass
class MountedDevice:
    workdir: str
    capacity: str = "4M"
    size: str = "16M"
    extra_hoststore: list[str] = field(default_factory=list)
    extra_vswapfs: list[str] = field(default_factory=list)
    hoststore_module: str = "hoststore"  # the tests run a lying store from tests.liarstore
    backing_path: str | None = None  # default: WORKDIR/backing
    hoststore: subprocess.Popen[bytes] | None = None
    vswapfs: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return os.path.join(self.workdir, "host.sock")

    @property
    def mountpoint(self) -> str:
        return os.path.join(self.workdir, "mnt")

    @property
    def swapfile(self) -> str:
        return os.path.join(self.mountpoint, "swap")

    @property
    def backing(self) -> str:
        return self.backing_path or os.path.join(self.workdir, "backing")

    def _log(self, name: str) -> IO[bytes]:
        return open(os.path.join(self.workdir, f"{name}.log"), "ab")

    def read_log(self, name: str) -> str:
        with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
            return f.read()

    # -- the store ------------------------------------------------------------------

    def start_hoststore(self) -> None:
        argv = [sys.executable, "-m", self.hoststore_module, "--listen", f"unix:{self.socket}"]
        if self.hoststore_module == "hoststore":
            argv += ["--capacity", self.capacity]
        argv += self.extra_hoststore
        with self._log("hoststore") as log:
            self.hoststore = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: os.path.exists(self.socket), 15, "hoststore", self.hoststore)

    def signal_hoststore(self, sig: int) -> None:
        assert self.hoststore is not None and self.hoststore.poll() is None
        self.hoststore.send_signal(sig)

    def stop_hoststore(self) -> None:
        """SIGTERM (it drains first), SIGKILL if it does not end."""
        if self.hoststore and self.hoststore.poll() is None:
            if stopped(self.hoststore.pid):
                self.hoststore.send_signal(signal.SIGCONT)
            self.hoststore.send_signal(signal.SIGTERM)
            try:
                self.hoststore.wait(30)
            except subprocess.TimeoutExpired:
                self.hoststore.kill()
                self.hoststore.wait()

    def host_stats(self) -> dict[str, Any]:
        import trio

        from hoststore.address import Address
        from hoststore.messages import Stats
        from vswapfs.hostclient import query

        return trio.run(query, Address("unix", path=self.socket), Stats())

    # -- vswapfs --------------------------------------------------------------------

    def start_vswapfs(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        argv = [sys.executable, "-m", "vswapfs", self.mountpoint, "--backing", self.backing,
                "--size", self.size, "--host", f"unix:{self.socket}", *self.extra_vswapfs]
        with self._log("vswapfs") as log:
            self.vswapfs = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: system.mount_type(self.mountpoint) == "fuse.vswapfs", 60, "vswapfs", self.vswapfs)

    def start(self) -> "MountedDevice":
        self.start_hoststore()
        self.start_vswapfs()
        return self

    def stats(self) -> dict[str, Any]:
        with open(os.path.join(self.mountpoint, "stats")) as f:
            return json.load(f)

    def wait_host_connected(self, timeout: float = 10) -> None:
        wait_for(lambda: self.stats()["host_connected"], timeout, "vswapfs connected to the store")

    # -- teardown -------------------------------------------------------------------

    def stop(self) -> None:
        """swapoff -> losetup -d -> unmount -> stop the daemons.  If a loop device on
        our file is still swapped on after swapoff, stop right there (StillSwappedOn):
        stopping anything more would take pages from under live swap."""
        for loop in system.loops_for(self.swapfile):
            if loop in system.swaps():
                try:
                    system.run(["swapoff", loop], timeout=1800)
                except system.CommandFailed as exc:
                    raise StillSwappedOn(f"{loop} is still swapped on ({exc}); leaving it all running") from None
            system.run(["losetup", "-d", loop])
        system.wait_detached(self.swapfile)
        if system.mount_type(self.mountpoint):
            clean = self.vswapfs and self.vswapfs.poll() is None and not stopped(self.vswapfs.pid)
            if not clean or subprocess.run(["umount", self.mountpoint], capture_output=True).returncode:
                subprocess.run(["umount", "-l", self.mountpoint], check=False)
        if self.vswapfs:
            if stopped(self.vswapfs.pid):
                self.vswapfs.send_signal(signal.SIGCONT)
            try:
                self.vswapfs.wait(15)
            except subprocess.TimeoutExpired:
                self.vswapfs.kill()
                self.vswapfs.wait()
        self.stop_hoststore()
