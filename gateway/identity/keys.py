"""The assertion signing keys: P-256 keys, the key directory's manifest, the ring chosen by time.

``identity.assertion.key_dir`` holds PEM keys and ``manifest.json`` managed by ``portvakt
assertion-keys create|rotate|prune DIR`` (``keyadmin.py``). ``rotate`` adds a key whose
``not_before_signing`` lies ``--publish-delay`` in the future: it is published in the JWKS at once
(after the gateway re-reads the manifest, which it polls) and used for signing only from then on;
the previous key gets ``retire_at = not_before_signing(new) + max_lifetime`` and stays in the JWKS
until then; ``prune`` deletes retired keys. Without a key dir, the gateway makes an ephemeral
P-256 key at start (kept across reloads, lost at restart): fine for the demo only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

MANIFEST = "manifest.json"
DEFAULT_MAX_LIFETIME = 300  # seconds a manifest promises no assertion outlives
DEFAULT_PUBLISH_DELAY = 300


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


@dataclass(slots=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    not_before_signing: float
    retire_at: float | None
    jwk: dict[str, str]
    header_b64: str  # the JOSE header, encoded once


def _jwk(pub: ec.EllipticCurvePublicKey) -> dict[str, str]:
    n = pub.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(n.x.to_bytes(32, "big")),
        "y": b64url(n.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the key id."""
    canon = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canon.encode()).digest())


def make_signing_key(
    private: ec.EllipticCurvePrivateKey, nbs: float = 0.0, retire_at: float | None = None
) -> SigningKey:
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError("assertion keys must be EC P-256 (ES256)")
    jwk = _jwk(private.public_key())
    kid = thumbprint(jwk)
    jwk = {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}
    header = json.dumps({"alg": "ES256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode()
    return SigningKey(kid, private, nbs, retire_at, jwk, b64url(header))


def read_manifest(key_dir: str) -> dict[str, Any]:
    with open(os.path.join(key_dir, MANIFEST), encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{key_dir}/{MANIFEST}: not a key manifest")
    return doc


def load_keys(key_dir: str) -> tuple[list[SigningKey], int]:
    """All keys of a key directory (sorted by not_before_signing) and its max_lifetime."""
    doc = read_manifest(key_dir)
    keys: list[SigningKey] = []
    for entry in doc["keys"]:
        path = os.path.join(key_dir, entry["file"])
        with open(path, "rb") as f:
            priv = serialization.load_pem_private_key(f.read(), password=None)
        k = make_signing_key(priv, float(entry["not_before_signing"]), entry.get("retire_at"))  # type: ignore[arg-type]
        if k.kid != entry["kid"]:
            raise ValueError(f"{path}: key does not match manifest kid {entry['kid']}")
        keys.append(k)
    keys.sort(key=lambda k: k.not_before_signing)
    if not keys:
        raise ValueError(f"{key_dir}: no keys (run `portvakt assertion-keys create {key_dir}`)")
    return keys, int(doc.get("max_lifetime", DEFAULT_MAX_LIFETIME))


class KeyRing:
    """The keys one forwarder publishes and signs with, chosen by time (no reload needed when a
    rotated key's ``not_before_signing`` arrives)."""

    def __init__(self, keys: list[SigningKey], source: str | None):
        self.keys = sorted(keys, key=lambda k: k.not_before_signing)
        self.source = source  # key dir, or None for an ephemeral key
        self._active: SigningKey | None = None
        self._switch_at = 0.0  # time before which _active stays right
        self._valid_until = 0.0

    def active(self, now: float) -> SigningKey:
        a = self._active
        if a is not None and self._switch_at <= now < self._valid_until:
            return a
        usable = [
            k for k in self.keys if k.not_before_signing <= now and (k.retire_at is None or k.retire_at > now)
        ]
        if not usable:
            raise RuntimeError("no assertion key usable now")
        a = usable[-1]
        later = [k.not_before_signing for k in self.keys if k.not_before_signing > now]
        self._active, self._switch_at = a, now
        self._valid_until = min(
            later + ([a.retire_at] if a.retire_at is not None else []), default=float("inf")
        )
        return a

    def published(self, now: float) -> list[SigningKey]:
        return [k for k in self.keys if k.retire_at is None or k.retire_at > now]


def manifest_stamp(path: str) -> tuple[int, int, int] | None:
    """A change stamp: the manifest is replaced atomically, so the inode changes too."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
