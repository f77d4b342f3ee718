"""trio listeners and one task per connection, dispatching requests to the :class:`Store`.

Store operations are in-memory and synchronous, so a connection's requests
are served in the order they arrive and all answers to one read from the
socket leave in one write: a pipelining client sees one round trip per burst,
not per request.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import Any

import trio

from . import protocol as p
from .address import Address
from .store import ClientPages, RequestError, Store

log = logging.getLogger("hoststore")

RECEIVE_SIZE = 1 << 20
SERVER_NAME = "hoststore"


async def open_listener(address: Address) -> trio.SocketListener:
    """Bind one listener.  A unix socket file left by a dead daemon is replaced;
    one a live daemon answers on is an error."""
    if address.kind == "tcp":
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
        return listeners[0]
    path = address.path
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a daemon that is gone
        else:
            raise OSError(errno.EADDRINUSE, f"a daemon already listens on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # pages are private: only the owner may connect
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return trio.SocketListener(sock)


def listener_address(listener: trio.SocketListener) -> Address:
    sock = listener.socket
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Address("unix", path=name)
    return Address("tcp", host=name[0], port=name[1])


class Session:
    """The server's state for one connection: protocol core plus the attached client."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = p.Connection("server")
        self.client: ClientPages | None = None

    def handle(self, event: p.Event) -> bytes:
        if isinstance(event, p.Request):
            return self._request(event)
        return b""  # responses to our own requests and notifications: none defined yet

    def _request(self, req: p.Request) -> bytes:
        if req.method == p.HELLO:
            return self._hello(req)
        try:
            result = self._call(req.method, req.params)
        except RequestError as exc:
            return self.conn.send_response(req.msgid, str(exc), None)
        return self.conn.send_response(req.msgid, None, result)

    def _hello(self, req: p.Request) -> bytes:
        params = req.params if isinstance(req.params, dict) else {}
        version = params.get("version")
        if version != p.PROTOCOL_VERSION:
            self.store.counters.hello_refused += 1
            return self.conn.refuse_hello(
                req.msgid, f"protocol version {version!r} not supported (this server speaks {p.PROTOCOL_VERSION})"
            )
        role = params.get("role")
        name = params.get("client")
        try:
            if role == p.ROLE_PAGER:
                if not isinstance(name, str) or not name:
                    raise RequestError("a pager's hello needs a client name")
                self.client = self.store.attach(
                    name, _int(params.get("device_size")), str(params.get("session", ""))
                )
            elif role != p.ROLE_OBSERVER:
                raise RequestError(f"unknown role {role!r}")
        except RequestError as exc:
            self.store.counters.hello_refused += 1
            return self.conn.refuse_hello(req.msgid, str(exc))
        log.info("hello from %s %r", role, name)
        return self.conn.accept_hello(
            req.msgid,
            {
                "version": p.PROTOCOL_VERSION,
                "server": SERVER_NAME,
                "instance": self.store.instance,
                "page_size": p.PAGE_SIZE,
            },
        )

    def _call(self, method: str, params: Any) -> Any:
        if method == p.STATS:
            return self.store.stats()
        client = self.client
        if client is None:
            raise RequestError(f"{method!r} needs a pager connection")
        if not isinstance(params, list):
            raise RequestError(f"{method!r} params must be an array")
        if method == p.PUT and len(params) == 3 and isinstance(params[2], bytes):
            return self.store.put(client, _int(params[0]), _int(params[1]), params[2])
        if method == p.GET and len(params) == 1:
            return list(self.store.get(client, params[0]))
        if method == p.INVALIDATE and len(params) == 3:
            return self.store.invalidate(client, _int(params[0]), _int(params[1]), _int(params[2]))
        raise RequestError(f"unknown method {method!r} or bad params")

    def close(self) -> None:
        if self.client is not None:
            self.store.detach(self.client)
            self.client = None


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"expected an integer, got {type(value).__name__}")
    return value


async def handle_stream(stream: trio.abc.Stream, store: Store) -> None:
    """Serve one connection until EOF, a transport error or a protocol error."""
    counters = store.counters
    counters.connections += 1
    counters.connections_active += 1
    session = Session(store)
    try:
        while not session.conn.closed:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                break
            session.conn.receive_data(data)
            out = []
            while not session.conn.closed and (event := session.conn.next_event()) is not None:
                out.append(session.handle(event))
            if out:
                await stream.send_all(b"".join(out))
    except p.ProtocolError as exc:
        counters.protocol_errors += 1
        log.warning("closing connection: %s", exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        session.close()
        counters.connections_active -= 1
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve(
    listeners: list[trio.SocketListener],
    store: Store,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on ``listeners`` until cancelled; reports the bound addresses through ``task_status``."""

    async def handler(stream: trio.abc.Stream) -> None:
        await handle_stream(stream, store)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started([listener_address(lst) for lst in listeners])
