"""Addresses as users write them: ``unix:/path/to/socket`` or ``tcp:HOST:PORT``."""

from __future__ import annotations

from dataclasses import dataclass

INPROC = "inproc"


@dataclass(frozen=True, slots=True)
class Address:
    kind: str  # "unix", "tcp", or "inproc" (a client's own in-process store; nothing listens there)
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "inproc":
            return INPROC
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6); ValueError names the problem."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"address {text!r} is not unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address {text!r} lacks HOST:PORT")
        host = host.removeprefix("[").removesuffix("]")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"address {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"address {text!r}: port {port} out of range")
        return Address("tcp", host=host, port=port)
    raise ValueError(f"address {text!r}: unknown kind {kind!r} (use unix: or tcp:)")


def parse_store_address(text: str) -> Address:
    """Where a client keeps its pages: an address as :func:`parse_address` reads
    it, or ``inproc`` (a store inside the client itself)."""
    return Address(INPROC) if text == INPROC else parse_address(text)
