"""The systemd units: systemd-analyze verify where it exists, and the settings that
keep systemd from ever killing a daemon whose pages are swapped on."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(TOP, "systemd")
BIN = os.path.dirname(sys.executable)  # the venv's console scripts stand in for /usr/local/bin


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(os.path.join(UNITS, name))
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_units_verify(tmp_path) -> None:
    for name in ("hoststore.service", "vswap@.service"):
        with open(os.path.join(UNITS, name)) as f:
            text = f.read().replace("/usr/local/bin/", BIN + "/")
        (tmp_path / name.replace("@.", "@demo.")).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "hoststore.service", "vswap@demo.service"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_systemd_never_kills_a_daemon_that_may_hold_swapped_pages() -> None:
    device = unit("vswap@.service")["Service"]
    assert device["ExecStart"].split()[-2:] == ["up", "$VSWAP_UP_ARGS"]
    assert device["ExecStop"].endswith(" down")
    assert device["KillMode"] == "process" and device["SendSIGKILL"] == "no"
    assert device["TimeoutStopSec"] == "infinity"  # swapoff may take long: never cut short
    store = unit("hoststore.service")["Service"]
    assert store["KillSignal"] == "SIGTERM" and store["SendSIGKILL"] == "no"  # SIGTERM drains
    assert "hoststore.service" in unit("vswap@.service")["Unit"]["After"]  # devices stop before the store
