"""A control socket beside the mount: vswapfs's counters without touching the mount.

``vswapctl status`` and ``stats`` must answer even when vswapfs is stopped or
wedged, and anything that reads inside a FUSE mount can block on its daemon
for ever.  So vswapfs also serves its counters on a unix socket (``--control
unix:PATH``): one request line (``stats``), one JSON line back.  A client
gives up after its timeout and says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("vswapfs.control")

MAX_REQUEST = 256


class ControlUnavailable(Exception):
    """No answer on the control socket (the message says what was tried)."""


async def serve_control(path: str, stats: Callable[[], dict[str, Any]], *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``stats`` on a unix socket at ``path`` (owner only) until cancelled."""
    remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(16)
    ino = os.stat(path).st_ino
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\n" not in request and len(request) < MAX_REQUEST:
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:
                        break
                    request += data
                command = request.split(b"\n", 1)[0].strip()
                if command == b"stats":
                    answer = {"ok": True, "stats": stats()}
                else:
                    answer = {"ok": False, "error": f"unknown request {command[:40]!r}"}
                await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a control request must never take vswapfs down
            log.exception("error answering a control request")
        finally:
            await trio.aclose_forcefully(stream)

    try:
        task_status.started()
        await trio.serve_listeners(handle, [listener])
    finally:
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except OSError:
            pass


def remove_stale(path: str) -> None:
    """Remove a control socket left by a vswapfs that is gone; OSError if in use or not a socket."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left by a vswapfs that is gone: nobody listens
    except OSError as exc:  # EAGAIN (a full backlog: a stopped vswapfs), a timeout...: someone is there
        raise OSError(errno.EADDRINUSE, f"{path} is in use ({exc.strerror or exc})") from None
    else:
        raise OSError(errno.EADDRINUSE, f"a vswapfs already serves {path}")
    finally:
        probe.close()


def query(path: str, timeout: float = 2.0) -> dict[str, Any]:
    """vswapfs's counters from its control socket, or ControlUnavailable within ``timeout``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"stats\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise ControlUnavailable(f"vswapfs did not answer on {path} in {timeout:g}s (stopped or wedged?)") from None
    except OSError as exc:
        raise ControlUnavailable(f"cannot reach vswapfs on {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlUnavailable(f"vswapfs sent no answer on {path}") from None
    if not isinstance(answer, dict) or not answer.get("ok") or not isinstance(answer.get("stats"), dict):
        raise ControlUnavailable(f"vswapfs refused the request on {path}: {answer}")
    return answer["stats"]
