"""Proofs exchanged at hello, from the standard library's hmac and secrets.

A client's identity at the store is its name plus a secret the store issues
at its first hello.  A reconnect proves it holds the secret with an HMAC over
both sides' fresh nonces, so a hello seen on the wire cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

from .messages import NONCE_SIZE, SECRET_SIZE


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_SIZE)


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def reconnect_proof(secret: bytes, name: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a client sends to prove it is the instance the store issued ``secret`` to."""
    return _mac(secret, b"vswapfs reconnect", name.encode(), server_nonce, client_nonce)


def check(expected: bytes, given: bytes | None) -> bool:
    return given is not None and hmac.compare_digest(expected, given)


# -- a shared token (``--token-file``), proven both ways over any transport -----------

MIN_TOKEN_BYTES = 16
MAX_TOKEN_BYTES = 4096


class TokenError(Exception):
    """A token file that cannot be used; the message says why."""


def load_token(path: str) -> bytes:
    """The token in ``path``: a regular file only its owner (root or us) can read,
    holding at least 16 bytes once surrounding whitespace is stripped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenError(f"cannot open token file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"token file {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise TokenError(f"token file {path} belongs to uid {st.st_uid}, not to root or to us")
        if st.st_mode & 0o077:
            raise TokenError(f"token file {path} is readable or writable by others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    token = data.strip()
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenError(f"token in {path} is shorter than {MIN_TOKEN_BYTES} bytes "
                         f"(make one with: head -c 32 /dev/urandom | base64 > {path})")
    return token


def token_proof(token: bytes, side: str, name: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Proof that ``side`` ("client" or "server") holds the token, bound to this
    connection's two nonces and the client's name: useless on any other connection."""
    return _mac(token, b"vswapfs token " + side.encode(), name.encode(), server_nonce, client_nonce)


def wrap_secret(token: bytes, secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The reconnect secret masked with a pad only token holders can compute on
    this connection: a passive listener on TCP does not learn it.  Its own inverse."""
    pad = _mac(token, b"vswapfs secret pad", server_nonce, client_nonce)
    return bytes(a ^ b for a, b in zip(secret, pad, strict=True))
