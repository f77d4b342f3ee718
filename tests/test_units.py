"""The systemd units: installed as docs/operations.md says (tools/install-units.sh, naming the
console scripts of the checkout's .venv), checked by systemd-analyze verify where it
exists; and the settings that keep systemd from ever killing a daemon whose pages are
swapped on."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(TOP, "systemd")
NAMES = ("hoststore.service", "vswap@.service")
SCRIPTS = ("hoststore", "vswapctl")
BIN = os.path.dirname(sys.executable)  # the console scripts of the venv running the tests


def unit(name: str, directory: str = UNITS) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(os.path.join(directory, name))
    return parser


@pytest.fixture
def checkout(tmp_path) -> str:
    """A checkout as tools/bootstrap.sh leaves it, as far as the units go: the install
    script, the units, and .venv/bin holding the console scripts (this venv's)."""
    tree = tmp_path / "checkout"
    (tree / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(TOP, "tools", "install-units.sh"), tree / "tools")
    shutil.copytree(UNITS, tree / "systemd")
    (tree / ".venv" / "bin").mkdir(parents=True)
    for script in SCRIPTS:
        if not os.access(os.path.join(BIN, script), os.X_OK):
            pytest.skip(f"no console script {script} next to {sys.executable} (install the project first)")
        os.symlink(os.path.join(BIN, script), tree / ".venv" / "bin" / script)
    return str(tree)


def install_units(tree: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", os.path.join(tree, "tools", "install-units.sh"), *args], capture_output=True,
                          text=True, timeout=60)


def test_the_installed_units_run_the_checkouts_console_scripts(checkout: str, tmp_path) -> None:
    out = tmp_path / "units"
    out.mkdir()
    done = install_units(checkout, "--dir", str(out))
    assert done.returncode == 0, done.stderr
    venv_bin = os.path.join(checkout, ".venv", "bin")
    assert unit("hoststore.service", str(out))["Service"]["ExecStart"].startswith(f"{venv_bin}/hoststore --listen ")
    device = unit("vswap@.service", str(out))["Service"]
    assert device["ExecStart"].startswith(f"{venv_bin}/vswapctl --state-dir ")
    assert device["ExecStop"].startswith(f"{venv_bin}/vswapctl --state-dir ")
    for name in NAMES:  # nothing but the Exec lines changed
        with open(os.path.join(UNITS, name)) as ours, open(out / name) as installed:
            changed = [(a, b) for a, b in zip(ours, installed, strict=True) if a != b]
        assert changed and all(a.startswith("Exec") and b == a.replace("/usr/local/bin/", venv_bin + "/")
                               for a, b in changed), changed
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644
    assert sorted(os.listdir(out)) == sorted(NAMES)  # no temporary file left


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_installed_units_verify(checkout: str, tmp_path) -> None:
    """`systemd-analyze verify` of the units as installed (on the repository's own files it
    says /usr/local/bin/hoststore and vswapctl are missing: nothing there makes them)."""
    out = tmp_path / "units"
    out.mkdir()
    assert install_units(checkout, "--dir", str(out)).returncode == 0
    shutil.copy(out / "vswap@.service", out / "vswap@demo.service")  # an instance, as systemctl start makes one
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "hoststore.service", "vswap@demo.service"],
                          cwd=out, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("args,needle", [
    ([], "run tools/bootstrap.sh first"),
    (["--bindir", "relative/bin"], "give an absolute path"),
    (["--bindir", "/opt/my bin"], "only letters, digits"),
    (["--bindir"], "--bindir needs a directory"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_install_units_refuses_what_would_make_broken_units(args: list[str], needle: str, checkout: str,
                                                           tmp_path) -> None:
    shutil.rmtree(os.path.join(checkout, ".venv"))  # bootstrap not run yet
    out = tmp_path / "units"
    out.mkdir()
    done = install_units(checkout, "--dir", str(out), *args)
    assert done.returncode != 0 and needle in done.stderr, done.stderr
    assert os.listdir(out) == []


def test_install_units_help_says_what_it_does(checkout: str) -> None:
    done = install_units(checkout, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: tools/install-units.sh")
    assert "--bindir" in done.stdout and "systemctl daemon-reload" in done.stdout


def test_systemd_never_kills_a_daemon_that_may_hold_swapped_pages() -> None:
    device = unit("vswap@.service")["Service"]
    assert device["ExecStart"].split()[-2:] == ["up", "$VSWAP_UP_ARGS"]
    assert device["ExecStop"].endswith(" down")
    assert device["KillMode"] == "process" and device["SendSIGKILL"] == "no"
    assert device["TimeoutStopSec"] == "infinity"  # swapoff may take long: never cut short
    store = unit("hoststore.service")["Service"]
    assert store["KillSignal"] == "SIGTERM" and store["SendSIGKILL"] == "no"  # SIGTERM drains
    assert "hoststore.service" in unit("vswap@.service")["Unit"]["After"]  # devices stop before the store
