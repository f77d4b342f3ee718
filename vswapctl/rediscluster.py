"""A local Redis Cluster (3 masters, 3 replicas) for the page tier's bench target and
tests: ``tools/redis-cluster.sh`` starts and stops it; this finds the script and free
ports for it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "redis-cluster.sh")


class ClusterError(Exception):
    pass


def redis_missing() -> str | None:
    """Why no local cluster can be started here, or None."""
    if not os.path.isfile(SCRIPT):
        return f"no {SCRIPT} (it comes with the source tree)"
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "redis-server is not installed, and only root with apt-get can install it"
    return None  # the script installs it


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(start: int = 7100) -> int:
    """Six free ports in a row, and their cluster bus ports (+10000)."""
    for base in range(start + (os.getpid() % 40) * 10, 7900, 10):
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(6)):
            return base
    raise ClusterError("no six free ports in 7100..7900 for a local cluster")


def start(directory: str, maxmemory: str = "256mb") -> tuple[str, int]:
    """Start a cluster with its files in ``directory``: (its tier address, its first port)."""
    base = free_base_port()
    try:
        done = subprocess.run([SCRIPT, "up", directory, "--port", str(base), "--maxmemory", maxmemory],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        stop(directory)
        raise ClusterError("tools/redis-cluster.sh up did not finish in 300s") from None
    if done.returncode != 0:
        stop(directory)
        raise ClusterError(f"tools/redis-cluster.sh up failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1], base


def stop(directory: str) -> None:
    subprocess.run([SCRIPT, "down", directory], capture_output=True, timeout=120)
