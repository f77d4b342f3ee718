"""A hoststore and a mounted vswapfs as child processes, without swap: the file
level, where faults can be injected without hurting anyone (no process has pages there).

Used by ``vswapctl faults`` (tools/faults.sh) and by the test suite.  Teardown
follows the one rule: nothing that serves a page listed in /proc/swaps is
stopped, unmounted or detached.
"""

from __future__ import annotations

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
        return os.path.join(os.path.realpath(self.workdir), "mnt")

    @property
    def control(self) -> str:
        return os.path.join(self.workdir, "vswapfs.sock")

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

        from pagewire.address import Address
        from pagewire.messages import Stats
        from vswapfs.hostclient import query

        return trio.run(query, Address("unix", path=self.socket), Stats())

    # -- vswapfs --------------------------------------------------------------------

    def start_vswapfs(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        argv = [sys.executable, "-m", "vswapfs", self.mountpoint, "--backing", self.backing,
                "--size", self.size, "--host", f"unix:{self.socket}", "--control", self.control,
                *self.extra_vswapfs]
        with self._log("vswapfs") as log:
            self.vswapfs = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: system.mount_type(self.mountpoint) == "fuse.vswapfs" and self._answers(), 60, "vswapfs",
                 self.vswapfs)

    def _answers(self) -> bool:
        from vswapfs.control import ControlUnavailable

        try:
            self.stats(timeout=1)
        except ControlUnavailable:
            return False
        return True

    def start(self) -> "MountedDevice":
        self.start_hoststore()
        self.start_vswapfs()
        return self

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """vswapfs's counters, from its control socket (never from inside the mount)."""
        from vswapfs.control import query

        return query(self.control, timeout)

    def wait_host_connected(self, timeout: float = 10) -> None:
        wait_for(lambda: self.stats()["host_connected"], timeout, "vswapfs connected to the store")

    # -- teardown -------------------------------------------------------------------

    def stop(self) -> None:
        """swapoff -> losetup -d -> unmount -> stop the daemons, by the rule: if a loop
        device on our file stays swapped on or attached, or vswapfs's file is still
        open, stop right there (StillSwappedOn) and leave everything running."""
        from vswapfs.control import ControlUnavailable

        for loop in system.loops_for(self.swapfile):
            if system.swapped_on(loop):
                try:
                    system.run(["swapoff", loop], timeout=1800)
                except system.CommandFailed as exc:
                    raise StillSwappedOn(f"{loop} is still swapped on ({exc}); leaving it all running") from None
            system.run(["losetup", "-d", loop])
        left = system.wait_detached(self.swapfile)
        if left:
            raise StillSwappedOn(f"{', '.join(left)} still holds {self.swapfile}; leaving it all running")
        alive = self.vswapfs is not None and self.vswapfs.poll() is None
        if system.mount_type(self.mountpoint) == "fuse.vswapfs":
            if alive:
                if stopped(self.vswapfs.pid):  # type: ignore[union-attr]
                    self.vswapfs.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                try:
                    opens = self.stats(timeout=5).get("swap_opens")
                except ControlUnavailable as exc:
                    raise StillSwappedOn(f"vswapfs does not answer ({exc}); leaving it all running") from None
                if opens:
                    raise StillSwappedOn(f"{self.swapfile} is still open; leaving it all running")
                system.run(["umount", self.mountpoint], timeout=60)
            else:
                system.run(["umount", "-l", self.mountpoint], timeout=60)
        if self.vswapfs is not None and alive:
            try:
                self.vswapfs.wait(15)
            except subprocess.TimeoutExpired:
                raise StillSwappedOn("vswapfs did not exit after its unmount; leaving it running") from None
        self.stop_hoststore()
