"""A pytest plugin (registered with the ``pytest11`` entry point: installing vswapfs is
enough) for test suites that need a real, controllable swap device.

* ``vswap_device``: a live vswapfs swap device with its own hoststore, for one
  test (``vswap_device_session`` for the whole session).  Its object gives
  ``.loop`` (the swapped-on loop device), ``.stats()`` (both daemons' counters,
  as ``vswapctl stats --json`` gives them), ``.set_policy(spec)`` and
  ``.drain()``.  It is always taken down afterwards, in the safe order
  (swapoff, losetup -d, unmount, stop the daemons), whatever the test did; if
  the kernel cannot take the pages back, it is left running and the test
  errors, saying how to finish.
* ``memory_cgroup``: a factory; ``memory_cgroup("64M").run(argv, **kwargs)``
  runs a command inside a fresh memory cgroup of that limit (v1 or v2) and
  returns the CompletedProcess (output captured as text unless kwargs say
  otherwise).  Every cgroup is removed afterwards.

Options: ``--vswap-size`` (device, default 256M), ``--vswap-capacity``
(store, default 64M), ``--vswap-policy`` (the store's admission policy).
Where the machine cannot (not root, no /dev/fuse, no memory cgroup) the
fixtures skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vswap", "vswapfs swap devices (the vswap_device fixture)")
    group.addoption("--vswap-size", default="256M", help="vswap_device's size (default 256M)")
    group.addoption("--vswap-capacity", default="64M", help="its store's capacity (default 64M)")
    group.addoption("--vswap-policy", default=None, help="its store's admission policy SPEC (default pressure)")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "vswap_device needs root (swapon, losetup, a FUSE mount)"
    if not os.path.exists("/dev/fuse"):
        return "vswap_device needs /dev/fuse"
    return None


class VswapDevice:
    """A device brought up by ``vswapctl up`` in a private state directory."""

    def __init__(self, state_dir: str) -> None:
        from .state import State

        self.state_dir = state_dir
        state = State.load(state_dir)
        assert state is not None
        self.loop: str = state.loop
        self.host: str = state.host

    def stats(self) -> dict[str, Any]:
        """Both daemons' counters: {"vswapfs": {...}, "hoststore": {...}}."""
        from .commands import common
        from .state import State

        state = State.load(self.state_dir)
        assert state is not None
        return {"vswapfs": common.read_vswapfs_stats(state), "hoststore": common.read_host_stats(common.StoreTarget.of(state))}

    def _query(self, message: Any, wait: float | None = None) -> Any:
        """One request to this device's store, reached as `up` was told to (its token,
        --insecure-tcp), the answer waited for ``wait`` seconds (default: vswapctl's)."""
        from .commands import common
        from .state import State

        state = State.load(self.state_dir)
        assert state is not None
        return common.StoreTarget.of(state).ask(message, wait)

    def set_policy(self, spec: str) -> dict[str, Any]:
        """Change the store's admission policy now; returns the policy and limits in force."""
        from pagewire.messages import Configure

        return self._query(Configure(policy=spec))

    def drain(self, timeout: float = 600.0) -> dict[str, Any]:
        """The store hands every page back to vswapfs (the backing file) and exits."""
        from pagewire.messages import Drain

        return self._query(Drain(), timeout)


def _bring_up(config: pytest.Config, say: Callable[[str], None]) -> tuple[VswapDevice, str]:
    from vswapcommon.sizes import parse_size

    from . import device, system

    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None  # never tmpfs: swapoff could deadlock
    workdir = tempfile.mkdtemp(prefix="vswap-pytest-", dir=base)
    state_dir = os.path.join(workdir, "state")
    extra = ["--policy", config.getoption("vswap_policy")] if config.getoption("vswap_policy") else []
    cfg = device.UpConfig(size=parse_size(config.getoption("vswap_size")),
                          backing=os.path.join(workdir, "backing"),
                          mountpoint=system.resolve_mountpoint(os.path.join(state_dir, "mnt")),
                          capacity=parse_size(config.getoption("vswap_capacity")), extra_hoststore=extra)
    try:
        device.bring_up(state_dir, cfg, say)
    except device.UpFailed as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"vswap_device could not come up here: {exc}")
    return VswapDevice(state_dir), workdir


def _take_down(dev: VswapDevice, workdir: str, say: Callable[[str], None]) -> None:
    from . import device

    if not device.take_down(dev.state_dir, say):
        pytest.fail(f"vswap_device in {dev.state_dir} could not be taken down (swapoff failed?): left running; "
                    f"free memory, then: vswapctl --state-dir {dev.state_dir} down", pytrace=False)
    shutil.rmtree(workdir, ignore_errors=True)


def _device(request: pytest.FixtureRequest) -> Iterator[VswapDevice]:
    said: list[str] = []
    dev, workdir = _bring_up(request.config, said.append)
    try:
        yield dev
    finally:
        _take_down(dev, workdir, said.append)


@pytest.fixture
def vswap_device(request: pytest.FixtureRequest) -> Iterator[VswapDevice]:
    """A live vswapfs swap device with its own store, for this test."""
    yield from _device(request)


@pytest.fixture(scope="session")
def vswap_device_session(request: pytest.FixtureRequest) -> Iterator[VswapDevice]:
    """A live vswapfs swap device with its own store, for the whole session."""
    yield from _device(request)


class _Cgroup:
    def __init__(self, cgroup: Any) -> None:
        self._cgroup = cgroup

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return self._cgroup.run(argv, **kwargs)


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[str], _Cgroup]]:
    """``memory_cgroup("64M").run(argv, **subprocess_kwargs)``: a command in a fresh memory cgroup."""
    from vswapcommon.sizes import parse_size

    from . import cgroup

    made: list[Any] = []

    def make(limit: str) -> _Cgroup:
        if os.geteuid() != 0:
            pytest.skip("memory_cgroup needs root")
        try:
            cg = cgroup.create(f"vswapctl-pytest-{os.getpid()}-{len(made)}", parse_size(limit))
        except (cgroup.CgroupUnavailable, OSError) as exc:
            pytest.skip(f"no memory cgroup here: {exc}")
        made.append(cg)
        return _Cgroup(cg)

    try:
        yield make
    finally:
        for cg in made:
            cg.remove()
