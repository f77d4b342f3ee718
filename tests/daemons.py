"""Start hoststore and vswapfs as real processes for the FUSE and swap levels,
and always take them down again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from vswapctl import system


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.02)


@dataclass
class Daemons:
    workdir: str
    capacity: str = "4M"
    size: str = "16M"
    extra_hoststore: list[str] = field(default_factory=list)
    extra_vswapfs: list[str] = field(default_factory=list)
    hoststore: subprocess.Popen | None = None
    vswapfs: subprocess.Popen | None = None

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
        return os.path.join(self.workdir, "backing")

    def log(self, name: str):
        return open(os.path.join(self.workdir, f"{name}.log"), "ab")

    def read_log(self, name: str) -> str:
        with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
            return f.read()

    def start_hoststore(self) -> None:
        argv = [sys.executable, "-m", "hoststore", "--listen", f"unix:{self.socket}",
                "--capacity", self.capacity, *self.extra_hoststore]
        self.hoststore = subprocess.Popen(argv, stdout=self.log("hoststore"), stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.socket), 15, "hoststore", self.hoststore)

    def stop_hoststore(self) -> None:
        if self.hoststore and self.hoststore.poll() is None:
            self.hoststore.send_signal(signal.SIGTERM)
            self.hoststore.wait(10)

    def start_vswapfs(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        argv = [sys.executable, "-m", "vswapfs", self.mountpoint, "--backing", self.backing,
                "--size", self.size, "--host", f"unix:{self.socket}", *self.extra_vswapfs]
        self.vswapfs = subprocess.Popen(argv, stdout=self.log("vswapfs"), stderr=subprocess.STDOUT)
        wait_for(lambda: system.mount_type(self.mountpoint) == "fuse.vswapfs", 15, "vswapfs", self.vswapfs)

    def start(self) -> "Daemons":
        self.start_hoststore()
        self.start_vswapfs()
        return self

    def stats(self) -> dict:
        with open(os.path.join(self.mountpoint, "stats")) as f:
            return json.load(f)

    def host_stats(self) -> dict:
        import trio

        from hoststore.address import Address
        from hoststore.messages import Stats
        from vswapfs.hostclient import query

        return trio.run(query, Address("unix", path=self.socket), Stats())

    def wait_host_connected(self, timeout: float = 10) -> None:
        wait_for(lambda: self.stats()["host_connected"], timeout, "vswapfs connected to the store")

    def stop(self) -> None:
        """Teardown in the safe order: loops off our file, unmount, then the daemons."""
        try:
            for loop in system.loops_for(self.swapfile):
                if loop in system.swaps():
                    system.run(["swapoff", loop], timeout=600)
                system.run(["losetup", "-d", loop])
            if system.mount_type(self.mountpoint):
                if self.vswapfs and self.vswapfs.poll() is None:
                    subprocess.run(["umount", self.mountpoint], check=False)
                else:
                    subprocess.run(["umount", "-l", self.mountpoint], check=False)
            if self.vswapfs:
                try:
                    self.vswapfs.wait(15)
                except subprocess.TimeoutExpired:
                    self.vswapfs.kill()
                    self.vswapfs.wait()
        finally:
            self.stop_hoststore()
