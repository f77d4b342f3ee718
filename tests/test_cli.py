"""Command lines: --help explains, every bad argument gets a one-line error and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from pagewire.address import parse_address
from vswapcommon.sizes import format_size, parse_size


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
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "unix:/x", "--pressure-holdoff", "-1"],
         "finite number of 0 or more"),
        ("vswapfs", ["/tmp", "--backing", "/var/tmp/x", "--host", "unix:/x", "--pressure-holdoff", "inf"],
         "finite number of 0 or more"),
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
        ("hoststore", ["--listen", "unix:/x", "--max-connections", "tcp=0"], "at least 1 connection"),
        ("hoststore", ["--listen", "unix:/x", "--max-connections", "256"], "give POOL=N"),
        ("hoststore", ["--listen", "unix:/x", "--max-connections", "tcp=8", "--max-connections", "tcp=9"],
         "pool tcp more than once"),
        ("hoststore", ["--listen", "unix:/x", "--max-in-flight", "1M"], "below what one connection may hold"),
        ("hoststore", ["--listen", "tcp:127.0.0.1:0", "--token-file", "/nonexistent"], "cannot open token file"),
        # TCP without a token: refused unless --insecure-tcp, and that only on loopback.
        ("hoststore", ["--listen", "tcp:127.0.0.1:0"], "accept that with --insecure-tcp"),
        ("hoststore", ["--listen", "tcp:0.0.0.0:0", "--insecure-tcp"], "loopback addresses only"),
        ("hoststore", ["--listen", "unix:/x", "--insecure-tcp"], "only for tcp:HOST:PORT"),
        ("vswapctl", ["up", "--host", "tcp:127.0.0.1:9"], "accept that with --insecure-tcp"),
        ("vswapctl", ["up", "--host", "tcp:192.0.2.1:9", "--insecure-tcp"], "loopback addresses only"),
        ("vswapctl", ["up", "--insecure-tcp"], "only for tcp:HOST:PORT"),
        ("vswapctl", ["policy", "--host", "tcp:127.0.0.1:9"], "accept that with --insecure-tcp"),
        ("vswapctl", ["drain", "--host", "tcp:127.0.0.1:9"], "accept that with --insecure-tcp"),
        ("vswapctl", ["top", "--host", "tcp:127.0.0.1:9", "--count", "1"], "accept that with --insecure-tcp"),
        ("vswapctl", ["evict", "x", "--host", "tcp:127.0.0.1:9"], "accept that with --insecure-tcp"),
        ("vswapctl", ["evict", "x" * 300, "--host", "unix:/x"], "NAME"),
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


@pytest.mark.parametrize("host,needle", [
    ("tcp:127.0.0.1:9", "accept that with --insecure-tcp"),
    ("tcp:192.0.2.1:9 --insecure-tcp", "loopback addresses only"),
    ("unix:/x --insecure-tcp", "only for tcp:HOST:PORT"),
    ("inproc --insecure-tcp", "only for tcp:HOST:PORT"),
])
def test_vswapfs_takes_tcp_without_a_token_only_when_told_and_only_on_loopback(tmp_path, host, needle) -> None:
    """Refused before anything is opened (the backing file's directory does not exist
    either, so nothing could be mounted even were the check missing)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run("vswapfs", str(mnt), "--backing", str(tmp_path / "missing" / "b"), "--size", "1M",
               "--host", *host.split())
    assert done.returncode == 2 and needle in done.stderr.splitlines()[-1], done.stderr


def test_membench_reports_the_memory_of_both_daemons() -> None:
    import json

    done = run("vswapctl", "membench", "--device-size", "64M", "--size", "8M", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"packed", "spread", "packed_no_shared_memory"}
    for name, r in report.items():
        assert r["pages_stored"] == 2048, name
        # Near the data stored, but for the one chunk (4 MiB) a shared slab counts ahead of
        # its pages (populated ahead of need, docs/shared-memory.md): half of this small
        # run.  What leaves goes back to the system, but for the spare chunk it keeps.
        assert 0.5 < r["store_bytes_per_byte_stored"] < 1.6 and r["store_given_back"] > 0.3, (name, r)
        assert r["pager_rss_own"] > 0
    assert report["packed"]["shared_reads"] > 0 and report["packed_no_shared_memory"]["shared_reads"] == 0


# -- tools/bootstrap.sh, on stand-ins: nothing is installed, no venv is made -----------------------

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534
# python as bootstrap calls it: always isolated (-I, or it fails: code from the caller's
# directory must never run), its checks pass; `-m venv DIR` fails ("venv exploded") or, with
# VENV=ok, makes DIR/bin/python a copy of this stand-in, whose `-m pip ...` installs nothing.
PYTHON_STAND_IN = """#!/bin/sh
[ "$1" = -I ] || { echo "stand-in: python run without -I: $*" >&2; exit 9; }
shift
if [ "$1" = -m ] && [ "$2" = venv ]; then
  [ "$VENV" = ok ] || { echo 'venv exploded'; exit 3; }
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
[ "$1" = --version ] && echo 'Python 3.11.9'
[ "$1" = -m ] && echo "stand-in: python $*"
exit 0
"""
# What bootstrap looks for or runs besides python: present, and doing nothing.
STAND_INS = ("fusermount3", "pkg-config", "losetup", "mkswap", "gcc", "patch", "redis-server", "apt-get", "tar")


def bootstrap_tree(base: str, name: str) -> str:
    """A checkout as far as bootstrap reads it."""
    tree = os.path.join(base, name)
    os.makedirs(os.path.join(tree, "tools"))
    shutil.copytree(os.path.join(TOP, "patches"), os.path.join(tree, "patches"))
    shutil.copy(os.path.join(TOP, "tools", "bootstrap.sh"), os.path.join(tree, "tools"))
    for file in ("setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(TOP, file), tree)
    return tree


def stand_ins(base: str) -> dict[str, str]:
    """bootstrap's environment: PATH finds the stand-ins first, PYTHON is one."""
    bin_dir = os.path.join(base, "bin")
    os.makedirs(bin_dir)
    for name, text in [("python", PYTHON_STAND_IN), *((n, f"#!/bin/sh\necho 'stand-in: {n}'\n") for n in STAND_INS)]:
        with open(os.path.join(bin_dir, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(bin_dir, name), 0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": os.path.join(bin_dir, "python"), "HOME": "/",
            "LANG": "C.UTF-8"}


def bootstrap(tree: str, env: dict[str, str], tmpdir: str, venv: str = "fail",
              user: int | None = None) -> subprocess.CompletedProcess[str]:
    """tools/bootstrap.sh in ``tree``, with TMPDIR=``tmpdir``, as ``user`` (default: us)."""
    as_user = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run([*as_user, "bash", os.path.join(tree, "tools", "bootstrap.sh")], capture_output=True,
                          text=True, timeout=120, env={**env, "TMPDIR": tmpdir, "VENV": venv})


def named_log(done: subprocess.CompletedProcess[str]) -> str:
    """The log a failed bootstrap names: `bootstrap: failed: STEP (its output: LOG)`."""
    failed = [line for line in done.stderr.splitlines() if line.startswith("bootstrap: failed:")]
    assert len(failed) == 1 and failed[0].endswith(")"), done.stderr
    return failed[0].rsplit("(its output: ", 1)[1][:-1]


def logs_in(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("vswapfs-bootstrap"))


def test_bootstrap_says_one_line_per_step_and_names_its_log_when_a_step_fails(tmp_path) -> None:
    """A failing step (here: making the venv) stops bootstrap with the step, its own private
    log's path and the end of that log."""
    tree, env = bootstrap_tree(str(tmp_path), "tree"), stand_ins(str(tmp_path))
    done = bootstrap(tree, env, str(tmp_path))
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == f"bootstrap: creating {tree}/.venv"
    assert lines[1].startswith("bootstrap: failed:") and "venv exploded" in done.stderr
    log = named_log(done)
    assert os.path.dirname(log) == str(tmp_path) and logs_in(str(tmp_path)) == [os.path.basename(log)]
    st = os.stat(log)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    with open(log) as f:
        assert "venv exploded" in f.read()


def test_bootstrap_leaves_no_log_behind_when_every_step_succeeds(tmp_path) -> None:
    tree, env = bootstrap_tree(str(tmp_path), "tree"), stand_ins(str(tmp_path))
    done = bootstrap(tree, env, str(tmp_path), venv="ok")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{tree}/.venv/bin/python"
    assert "installing trio, then vswapfs" in done.stderr
    assert logs_in(str(tmp_path)) == []


@pytest.fixture
def shared_tmp():
    """A directory like /tmp (world-writable, sticky) under a base other users can enter."""
    base = tempfile.mkdtemp(prefix="vswapfs-bootstrap-test-")
    os.chmod(base, 0o755)
    shared = os.path.join(base, "tmp")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    try:
        yield base, shared
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run bootstrap as root and then as nobody")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux) to run as nobody")
@pytest.mark.skipif(not os.path.exists("/usr/include/fuse3/fuse_lowlevel.h"),
                    reason="no libfuse3-dev: bootstrap as nobody would stop at the missing package")
def test_a_second_user_bootstraps_after_root_did_and_no_log_name_can_be_planted(shared_tmp) -> None:
    """Root ran bootstrap (once well, once failing) in a shared TMPDIR where another user had
    planted a link at the log's old fixed name; then that user runs it: root never wrote
    through the link, and the user gets a log of their own instead of "Permission denied"."""
    base, shared = shared_tmp
    env = stand_ins(base)
    victim = os.path.join(base, "victim")
    with open(victim, "w") as f:
        f.write("root's file\n")
    planted = os.path.join(shared, "vswapfs-bootstrap.log")
    os.symlink(victim, planted)
    os.lchown(planted, NOBODY, NOBODY)

    assert bootstrap(bootstrap_tree(base, "root-ok"), env, shared, venv="ok").returncode == 0
    root_failed = bootstrap(bootstrap_tree(base, "root-failing"), env, shared)
    root_log = named_log(root_failed)
    with open(victim) as f:
        assert f.read() == "root's file\n"

    users = bootstrap_tree(base, "users")
    for path in [users, *(os.path.join(d, n) for d, dirs, files in os.walk(users) for n in dirs + files)]:
        os.lchown(path, NOBODY, NOBODY)
    done = bootstrap(users, env, shared, user=NOBODY)
    assert done.returncode == 1 and "Permission denied" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[0] == f"bootstrap: creating {users}/.venv"
    log = named_log(done)
    assert log != root_log and os.path.dirname(log) == shared
    st = os.stat(log)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
    with open(log) as f:
        assert "venv exploded" in f.read()
    assert logs_in(shared) == sorted([os.path.basename(planted), os.path.basename(root_log), os.path.basename(log)])
    assert os.stat(root_log).st_uid == 0



def test_the_demo_prints_only_counters_vswapfs_has() -> None:
    """tools/demo.sh formats vswapfs's counters by name after its workload: a counter
    renamed or removed made the quick start end in a KeyError."""
    import re

    from vswapfs.pager import PagerCounter

    with open(os.path.join(os.path.dirname(__file__), "..", "tools", "demo.sh")) as f:
        names = re.findall(r"%\((\w+)\)d", f.read())
    assert names and set(names) <= {c.value for c in PagerCounter}
