"""Command lines: --help explains, every bad argument gets a one-line error and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hoststore.address import parse_address
from hoststore.sizes import format_size, parse_size


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", ["hoststore", "vswapfs", "vswapctl"])
def test_help(module: str) -> None:
    done = run(module, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout and len(done.stdout.splitlines()) > 5


@pytest.mark.parametrize(
    "module,args,needle",
    [
        ("hoststore", ["--listen", "unix:/x", "--capacity", "12Q"], "size"),
        ("hoststore", ["--listen", "udp:1"], "unknown kind"),
        ("hoststore", ["--listen", "tcp:localhost:99999"], "out of range"),
        ("hoststore", ["--listen", "unix:/x", "--high-watermark", "50", "--low-watermark", "60"], "above"),
        ("hoststore", ["--listen", "unix:/x", "--capacity", "1000"], "multiple of 4096"),
        ("hoststore", [], "--listen"),
        ("vswapfs", ["/nonexistent-mnt", "--backing", "/var/tmp/x", "--host", "unix:/x"], "not a directory"),
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "unix:/x", "--size", "5000"], "multiple of 4096"),
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "nowhere"], "unix:PATH"),
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "unix:/x", "--write-timeout", "-1"], "positive"),
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "unix:/x", "--name", "x" * 300], "--name"),
        ("hoststore", ["--listen", "unix:/x", "--away-timeout", "0"], "positive"),
        ("hoststore", ["--listen", "unix:/x", "--pressure-source", "vibes"], "pressure source"),
        ("vswapctl", ["up", "--size", "1X"], "size"),
        ("vswapctl", ["up", "--size", "1000"], "multiple of 4096"),
        ("vswapctl", ["up", "--host", "ftp:x"], "unknown kind"),
        ("vswapctl", ["bogus"], "invalid choice"),
        ("vswapctl", ["up", "--token-file", "/etc/hostname"], "--host"),
        ("vswapctl", ["bench", "--runs", "2"], "at least 3 runs"),
        ("vswapctl", ["bench", "--targets", "zram,nfs"], "unknown target 'nfs'"),
        ("hoststore", ["--listen", "tcp:0.0.0.0:7070"], "not a loopback address"),
        ("hoststore", ["--listen", "unix:/x"], "socket directory / can be entered"),
        ("hoststore", ["--listen", "unix:/x", "--weight", "a"], "NAME=W"),
        ("hoststore", ["--listen", "unix:/x", "--quota", "=5M"], "empty client name"),
        ("hoststore", ["--listen", "unix:/x", "--max-connections", "0"], "at least 1"),
        ("hoststore", ["--listen", "tcp:127.0.0.1:0", "--token-file", "/nonexistent"], "cannot open token file"),
    ],
)
def test_bad_arguments(module: str, args: list[str], needle: str) -> None:
    done = run(module, *args)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if not line.startswith("usage:") and line.strip()]
    assert lines and needle in lines[-1], done.stderr
    assert lines[-1].startswith(module) and ": error:" in lines[-1], done.stderr


def test_status_without_a_device(tmp_path) -> None:
    done = run("vswapctl", "--state-dir", str(tmp_path), "status")
    assert done.returncode != 0 and "no device is up" in done.stderr


def test_down_without_a_device_is_fine(tmp_path) -> None:
    done = run("vswapctl", "--state-dir", str(tmp_path), "down")
    assert done.returncode == 0 and "nothing to take down" in done.stdout


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64K", 65536), ("1G", 1 << 30), ("512MiB", 512 << 20),
                                        ("1.5M", 3 << 19), ("2gb", 2 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "x1", "-1M", "1Q"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_and_addresses() -> None:
    assert format_size(1 << 30) == "1G" and format_size(4097) == "4097"
    assert str(parse_address("tcp:[::1]:7070")) == "tcp:[::1]:7070"
    assert parse_address("unix:/run/x.sock").path == "/run/x.sock"


def test_microbench_runs_every_transport_and_reports_the_checksum_cost() -> None:
    import json

    done = run("vswapctl", "microbench", "--seconds", "0.1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["transports"]) == {"inproc", "unix+shared", "unix", "tcp"}
    for name, result in report["transports"].items():
        for batch in ("1", "8", "64", "256"):
            assert result[batch]["write_pages_per_s"] > 0 and result[batch]["read_pages_per_s"] > 0
        assert result["checksum_errors"] == 0 and result["host_pages"] > 0
        # Only the shared-memory transports read without asking the store.
        assert (result["shared_reads"] > 0) == (name in ("inproc", "unix+shared")), name
    for batch in ("1", "8", "64", "256"):
        assert 0 < report["checksum"][batch]["read_us_per_page"] < 1000


def test_vswapfs_refuses_a_token_file_others_can_read(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("a token long enough to be one\n")
    token.chmod(0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run("vswapfs", str(mnt), "--backing", str(tmp_path / "b"), "--size", "1M", "--host", "tcp:127.0.0.1:9",
               "--token-file", str(token))
    assert done.returncode != 0 and "chmod 600" in done.stderr and not (tmp_path / "b").exists()


def test_membench_reports_the_memory_of_both_daemons() -> None:
    import json

    done = run("vswapctl", "membench", "--device-size", "64M", "--size", "8M", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"packed", "spread", "packed_no_shared_memory"}
    for name, r in report.items():
        assert r["pages_stored"] == 2048, name
        # Near the data stored; what leaves goes back to the system, but for the one
        # spare chunk (4 MiB) the store keeps, half of this small run.
        assert 0.5 < r["store_bytes_per_byte_stored"] < 1.5 and r["store_given_back"] > 0.3, (name, r)
        assert r["pager_rss_own"] > 0
    assert report["packed"]["shared_reads"] > 0 and report["packed_no_shared_memory"]["shared_reads"] == 0


def test_bootstrap_says_one_line_per_step_and_names_its_log_when_a_step_fails(tmp_path) -> None:
    """A failing step (here: making the venv, with a python whose venv module fails)
    stops bootstrap with the step, the log's path and the end of that log."""
    import shutil
    import subprocess
    import sys

    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    (tree / "patches").mkdir()
    shutil.copy(os.path.join(top, "tools", "bootstrap.sh"), tree / "tools")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(top, name), tree)
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = venv ]; then echo 'venv exploded'; exit 3; fi\n"
                    f"exec {sys.executable} \"$@\"\n")
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(tree / "tools" / "bootstrap.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": str(stub), "TMPDIR": str(tmp_path)})
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == f"bootstrap: creating {tree}/.venv"
    assert lines[1].startswith("bootstrap: failed:") and str(tmp_path / "vswapfs-bootstrap.log") in lines[1]
    assert "venv exploded" in done.stderr
