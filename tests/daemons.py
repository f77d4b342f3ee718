"""The FUSE levels' daemons: a hoststore and a mounted vswapfs as real processes
(``vswapctl.mounted``), always taken down again in the safe order."""

from __future__ import annotations

from vswapctl.mounted import MountedDevice as Daemons
from vswapctl.mounted import wait_for

__all__ = ["Daemons", "wait_for"]
