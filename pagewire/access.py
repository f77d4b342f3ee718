"""Who may use the store, and how each side proves it is who it says.

* Unix socket: the kernel tells us the peer's uid (SO_PEERCRED).  Root and the
  store's own user may always connect, others only when ``--allow-uid`` names
  them; admin requests (``drain``, every client's stats) are for root and the
  store's own user alone.
* TCP: nobody is known by address.  With ``--token-file`` both sides prove at
  hello that they hold the shared token (HMAC over both connection nonces, see
  ``pagewire.auth``), so vswapfs also knows it reached the real store.  Without
  a token both sides refuse TCP unless told ``--insecure-tcp``, and even then
  only on loopback (:func:`tcp_refusal`: one rule for the store, vswapfs and
  vswapctl).

The token proves who is at each end; it does not hide the pages on the wire.
Across a network nobody should be able to watch, use a tunnel (ssh, WireGuard)
as well.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import struct
from dataclasses import dataclass, field

import trio

from .address import Address


# What TCP without a token gives up, said wherever --insecure-tcp is offered.
INSECURE_TCP_GIVES_UP = ("anyone on this host who can bind or hold that port (while the store is down, say), or "
                         "connect to it, can read and write the pages: nothing proves who is at either end")


@dataclass(frozen=True)
class Access:
    token: bytes | None = None
    allowed_uids: frozenset[int] = field(default_factory=frozenset)
    insecure_tcp: bool = False  # TCP without a token on loopback, as --insecure-tcp accepts

    @property
    def own_uids(self) -> frozenset[int]:
        return frozenset((0, os.geteuid()))

    def uid_allowed(self, uid: int) -> bool:
        return uid in self.own_uids or uid in self.allowed_uids

    def is_admin(self, uid: int | None) -> bool:
        return uid is not None and uid in self.own_uids


IN_PROCESS = "this process"  # the one client of a store inside its own process (vswapfs --host inproc)


def peer_identity(uid: int | None, token: bytes | None) -> str:
    """Who a peer is, as the owner of the client names it creates: its uid on the unix
    socket; on TCP, a holder of the store's token, or, without one, any TCP peer at all
    (all alike: nothing tells them apart)."""
    if uid is not None:
        return f"uid {uid}"
    return "a holder of the token on TCP" if token is not None else "an unauthenticated TCP peer"


def peer_uid(stream: trio.abc.Stream) -> int | None:
    """The uid of a unix-socket peer (SO_PEERCRED), None for TCP."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def peer_key(stream: trio.abc.Stream) -> str:
    """Whom a connection counts against for the per-peer limits: a uid or a host."""
    uid = peer_uid(stream)
    if uid is not None:
        return f"uid {uid}"
    sock = getattr(stream, "socket", None)
    try:
        return host_key(sock.getpeername()[0]) if sock is not None else "unknown peer"
    except OSError:
        return "unknown peer"


# An IPv6 host is given a /64 (or more) to number its interfaces as it likes.
IPV6_HOST_PREFIX = 64


def host_key(address: str) -> str:
    """A TCP peer's host.  Loopback is one host, whatever address of it a peer uses:
    any local process can connect from each of 127.0.0.0/8 (and ::1, and IPv4
    mapped into IPv6), so counting them apart would multiply its limits.  For the
    same reason an IPv6 peer is its /64: one host can take any address of it."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return f"address {address}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        return f"network {ipaddress.IPv6Network((ip, IPV6_HOST_PREFIX), strict=False)}"
    return f"address {ip}"


def before_hello(key: str) -> str:
    """Whom a TCP connection counts against until its hello succeeds: its host's
    connections not yet past hello, apart from those that are (their own rate
    and count), so that a peer without the token cannot spend a token holder's
    limits on the same host."""
    return f"{key}, before hello"


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address ("" is every interface: no)."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class AccessError(Exception):
    """A listener the store refuses to open as configured; the message says why."""


def tcp_refusal(address: Address, token: bool, insecure_tcp: bool) -> str | None:
    """Why TCP at ``address`` may not be used, or None.  Without a token nothing proves
    who is at the other end, on either side: refused unless ``insecure_tcp`` accepts
    that, and even then only on loopback.  Not TCP, or with a token: None."""
    if address.kind != "tcp" or token:
        return None
    if not is_loopback(address.host):
        return (f"{address} is not a loopback address and no --token-file is given: anyone who can reach it "
                f"could read and write the pages.  Give a --token-file (the same on both sides); --insecure-tcp "
                f"is for loopback addresses only")
    if not insecure_tcp:
        return (f"{address} without a --token-file: {INSECURE_TCP_GIVES_UP}.  Give a --token-file (the same on "
                f"both sides), use a unix socket, or accept that with --insecure-tcp")
    return None


def check_tcp_options(addresses: list[Address], token: bool, insecure_tcp: bool) -> str | None:
    """What is wrong with these addresses and TCP options on a command line, or None
    (hoststore's listeners, vswapfs's and vswapctl's --host)."""
    if insecure_tcp and not any(a.kind == "tcp" for a in addresses):
        return "--insecure-tcp is only for tcp:HOST:PORT addresses"
    if insecure_tcp and token:
        return "--insecure-tcp does not go with --token-file: with the token, TCP is authenticated"
    for address in addresses:
        problem = tcp_refusal(address, token, insecure_tcp)
        if problem is not None:
            return problem
    return None


def check_listener(address: Address, access: Access) -> None:
    """Refuse, before anything is bound, a listener that would let strangers in."""
    if address.kind == "tcp":
        problem = tcp_refusal(address, access.token is not None, access.insecure_tcp)
        if problem is not None:
            raise AccessError(problem)
        return
    check_socket_dir(os.path.dirname(os.path.abspath(address.path)), bool(access.allowed_uids))


def check_socket_dir(directory: str, others_enter: bool) -> None:
    """The socket's directory must belong to root or us and be writable by nobody
    else (nobody can put another socket in its place); without ``--allow-uid``
    nobody else may even enter it."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise AccessError(f"socket directory {directory}: {exc.strerror}") from None
    if st.st_uid not in (0, os.geteuid()):
        raise AccessError(f"socket directory {directory} belongs to uid {st.st_uid}, not to root or to us")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise AccessError(f"socket directory {directory} is writable by others (mode {mode:04o}): another "
                          f"process could put its own socket there.  Use a directory of mode 0700 "
                          f"(0711 with --allow-uid)")
    if mode & 0o055 and not others_enter:
        raise AccessError(f"socket directory {directory} can be entered or listed by others (mode {mode:04o}): "
                          f"use a directory of mode 0700, or name the users who may connect with --allow-uid")


def socket_mode(access: Access) -> int:
    """Mode of the socket file: others need write permission to connect, and get it
    only when ``--allow-uid`` lets some in (the uid check then decides)."""
    return 0o666 if access.allowed_uids else 0o600
