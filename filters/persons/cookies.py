"""AEAD cookie codec: AES-256-GCM, key id in the clear, key rotation.

A value is ``v1.<kid>.<base64url(nonce 12 || ciphertext+tag)>``. The AAD is the cookie name and
the key id, so a value cut from one cookie cannot be pasted into another, nor relabelled with
another key id. The first configured key encrypts; every configured key decrypts (rotation: put
the new key first, keep the old one until the longest session it sealed has ended). Anything that
does not decrypt reads as "no cookie": a tampered cookie gives a fresh login, never an error.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_COOKIE_CHARS = 1024


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class CookieCodec:
    def __init__(self, keys: Iterable[tuple[str, str]]):
        """``keys``: (key id, secret) pairs, newest first."""
        self._keys = [(kid, AESGCM(hashlib.sha256(secret.encode()).digest())) for kid, secret in keys]
        if not self._keys:
            raise ValueError("at least one cookie key")
        self._by_id = dict(self._keys)

    def seal(self, name: str, plaintext: bytes) -> str:
        kid, aead = self._keys[0]
        nonce = os.urandom(12)
        ct = aead.encrypt(nonce, plaintext, f"{name}|{kid}".encode())
        return f"v1.{kid}.{_b64e(nonce + ct)}"

    def open(self, name: str, value: str) -> bytes | None:
        """The plaintext, or None for anything that is not a value this codec sealed."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            return None
        aead = self._by_id.get(parts[1])
        if aead is None:
            return None
        try:
            raw = _b64d(parts[2])
        except (ValueError, TypeError):
            return None
        if len(raw) < 12 + 16 or _b64e(raw) != parts[2]:  # canonical encoding only: one spelling per value
            return None
        try:
            return aead.decrypt(raw[:12], raw[12:], f"{name}|{parts[1]}".encode())
        except InvalidTag:
            return None


def seal_blob(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt session data with its own data key (the key lives only in the browser's cookie)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_blob(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    if len(blob) < 28:
        return None
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        return None


def cookie_values(header_values: Iterable[str], name: str) -> list[str]:
    """Every value of cookie ``name`` in the request's Cookie headers (a tossed duplicate shows
    up as a second value)."""
    out = []
    for h in header_values:
        for part in h.split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name:
                out.append(v.strip().strip('"'))
    return out


def strip_cookies(header_values: Iterable[str], is_ours) -> str | None:  # type: ignore[no-untyped-def]
    """The Cookie header without the cookies ``is_ours(name)`` claims; None when nothing is left."""
    kept = []
    for h in header_values:
        for part in h.split(";"):
            p = part.strip()
            if not p:
                continue
            k = p.partition("=")[0].strip()
            if not is_ours(k):
                kept.append(p)
    return "; ".join(kept) if kept else None
