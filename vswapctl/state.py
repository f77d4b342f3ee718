"""What ``vswapctl up`` set up, saved after every step so that ``down`` can undo
even a half-finished ``up`` or a run whose daemons died."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

DEFAULT_STATE_DIR = "/run/vswapfs"


@dataclass
class State:
    state_dir: str
    mountpoint: str = ""
    backing: str = ""
    host: str = ""
    size: int = 0
    loop: str = ""
    hoststore_pid: int = 0  # 0: we did not start one (--host)
    vswapfs_pid: int = 0
    created_mountpoint: bool = False
    swapon_options: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    @property
    def socket(self) -> str:
        return os.path.join(self.state_dir, "host.sock")

    @property
    def swapfile(self) -> str:
        return os.path.join(self.mountpoint, "swap")

    @property
    def statsfile(self) -> str:
        return os.path.join(self.mountpoint, "stats")

    def log(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.log")

    def save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for path in (self.path, self.socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @classmethod
    def load(cls, state_dir: str) -> "State | None":
        try:
            with open(os.path.join(state_dir, "state.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        data["state_dir"] = state_dir
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
