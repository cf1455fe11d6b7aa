"""Audit keys and the sealing of person ids to the auditor.

Keys: ``audit.key`` (or ``key_file``) is the audit key; the record MAC key and the pseudonym key
are derived from it (HMAC-SHA256(key, "portvakt-audit-mac" / "portvakt-audit-pseudonym")).

A person never appears in clear: ``caller.person`` is ``{"pseudonym": HMAC-SHA256(k_p, pid)[:32
hex], "sealed": ...}``; ``sealed`` is the pid encrypted to ``audit.auditor_public_key`` (X25519:
``x25519:`` base64url(ephemeral public || nonce || AES-256-GCM ciphertext), key from HKDF-SHA256
over the shared secret, AAD the pseudonym; RSA: ``rsa-oaep:`` RSA-OAEP-SHA256 with the pseudonym
as label). ``portvakt audit reveal`` opens it with ``unseal``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEAL_INFO = b"portvakt-audit-seal-v1"


def derive_keys(key: bytes) -> tuple[bytes, bytes]:
    """(record MAC key, pseudonym key) from the audit key."""
    return (
        hmac.new(key, b"portvakt-audit-mac", hashlib.sha256).digest(),
        hmac.new(key, b"portvakt-audit-pseudonym", hashlib.sha256).digest(),
    )


def read_key_text(text: str) -> bytes:
    k = text.strip().encode("utf-8")
    if len(k) < 16:
        raise ValueError("audit key must be at least 16 characters")
    return k


def pseudonym(pseudo_key: bytes, pid: str) -> str:
    return hmac.new(pseudo_key, pid.encode(), hashlib.sha256).hexdigest()[:32]


class Sealer:
    """Encrypts a person's id to the auditor's public key (X25519 sealed box or RSA-OAEP)."""

    def __init__(self, public_key: Any):
        if not isinstance(public_key, (x25519.X25519PublicKey, rsa.RSAPublicKey)):
            raise ValueError("auditor_public_key must be an X25519 or RSA public key")
        self.key = public_key
        if isinstance(public_key, x25519.X25519PublicKey):
            self._pub_raw = public_key.public_bytes_raw()

    @classmethod
    def from_pem(cls, path: str) -> Sealer:
        with open(path, "rb") as f:
            return cls(serialization.load_pem_public_key(f.read()))

    def seal(self, value: str, binding: str) -> str:
        """Encrypt ``value``; ``binding`` (the pseudonym) is authenticated with it, so the sealed
        value opens only beside that pseudonym."""
        aad = binding.encode()
        if isinstance(self.key, rsa.RSAPublicKey):
            ct = self.key.encrypt(
                value.encode(),
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=aad),
            )
            return "rsa-oaep:" + _b64u(ct)
        eph = x25519.X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes_raw()
        k = _seal_key(eph.exchange(self.key), eph_pub, self._pub_raw)
        nonce = os.urandom(12)
        ct = AESGCM(k).encrypt(nonce, value.encode(), aad)
        return "x25519:" + _b64u(eph_pub + nonce + ct)


def _seal_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=SEAL_INFO).derive(
        shared
    )


def unseal(private_key: Any, sealed: str, binding: str) -> str:
    """Open a sealed value with the auditor's private key (``binding``: the pseudonym stored with
    it). Raises ValueError when it does not open."""
    kind, _, body = sealed.partition(":")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    aad = binding.encode()
    try:
        if kind == "rsa-oaep" and isinstance(private_key, rsa.RSAPrivateKey):
            pt = private_key.decrypt(
                raw, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=aad)
            )
        elif kind == "x25519" and isinstance(private_key, x25519.X25519PrivateKey):
            eph_pub, nonce, ct = raw[:32], raw[32:44], raw[44:]
            k = _seal_key(
                private_key.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub)),
                eph_pub,
                private_key.public_key().public_bytes_raw(),
            )
            pt = AESGCM(k).decrypt(nonce, ct, aad)
        else:
            raise ValueError(f"sealed with {kind!r}, key does not fit")
    except ValueError:
        raise
    except Exception as e:  # InvalidTag and friends
        raise ValueError(f"cannot open sealed value: {type(e).__name__}") from None
    return pt.decode()


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")
