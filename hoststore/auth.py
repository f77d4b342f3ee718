"""Proofs exchanged at hello, from the standard library's hmac and secrets.

A client's identity at the store is its name plus a secret the store issues
at its first hello.  A reconnect proves it holds the secret with an HMAC over
both sides' fresh nonces, so a hello seen on the wire cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
