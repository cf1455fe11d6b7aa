"""The signed identity assertion: an ES256 JWT of the request's verified facts.

The claims: ``iss`` (``identity.assertion.issuer``), ``aud`` (the upstream's name), ``iat``,
``exp`` (``iat + lifetime_seconds``), ``jti``, ``route``, ``service`` and, when known,
``consumer_org``, ``integration_id``, ``integration_org``, ``certificate_org``, ``scope``, ``acr``,
``client_amr``, ``token_kind``, ``target_org``, ``legal_basis``, ``acting_org``, for a logged-in
person ``amr``, ``auth_time`` and ``session``, and (opt-in routes only) ``pid``. The public keys
are served as a JWKS by the admin listener at ``/.well-known/jwks.json`` (``AssertionSigner.jwks``).
The keys and their rotation: ``keys.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.identity.config import AssertionConfig
from gateway.identity.keys import (
    MANIFEST,
    KeyRing,
    SigningKey,
    b64url,
    load_keys,
    make_signing_key,
    manifest_stamp,
)

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.identity")

# Built once: json.dumps with non-default options builds a new encoder per call (about 5 µs), and
# the ECDSA algorithm object costs about 3 µs to make; both are immutable.
_claims_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ES256 = ec.ECDSA(hashes.SHA256())

MAX_SIGNED = 10_000  # signed assertions kept for reuse (one per principal, route and key)


class AssertionSigner:
    """Signs assertions with the ring's active key and keeps the ring in step with the key
    directory's manifest (polled). Built once per runtime, by the ``Forwarder``."""

    def __init__(self, config: AssertionConfig, key_dir: str | None):
        self.config = config
        self.key_dir = key_dir
        self._lifetime = config.lifetime_seconds
        reuse = config.reuse_seconds
        # A reused assertion keeps at least a second to live (lifetime - reuse).
        self._reuse = self._lifetime // 2 if reuse is None else max(0, min(reuse, self._lifetime - 1))
        # (kid, route, facts) -> (token, jti, iat): one signature per principal and window.
        self._signed: dict[tuple[Any, ...], tuple[str, str, int]] = {}
        self._issuer = config.issuer
        self._manifest_mtime: tuple[int, int, int] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._key_error: str | None = None
        self.clock = time.time  # replaceable in tests
        if key_dir is not None:
            keys, max_lifetime = load_keys(key_dir)
            if self._lifetime > max_lifetime:
                raise ValueError(
                    f"identity.assertion.lifetime_seconds ({self._lifetime}) exceeds the key manifest's "
                    f"max_lifetime ({max_lifetime}): rotation could retire a key under a live assertion"
                )
            self._manifest_mtime = manifest_stamp(os.path.join(key_dir, MANIFEST))
            self.ring = KeyRing(keys, key_dir)
        else:
            self.ring = KeyRing([make_signing_key(ec.generate_private_key(ec.SECP256R1()))], None)

    # -- lifecycle
    def adopt(self, previous: AssertionSigner) -> None:
        """Keep the ephemeral key across reloads (upstreams may have cached it)."""
        if self.key_dir is None and previous.key_dir is None:
            self.ring = previous.ring

    async def start(self) -> None:
        if self.key_dir is not None and self.config.manifest_poll_seconds > 0:
            self._poll_task = asyncio.create_task(self._poll_manifest(), name="assertion-key-poll")
        if self.key_dir is None and self.config.enabled:
            log.warning("identity.assertion.key_dir not set: signing assertions with an ephemeral key")

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
            self._poll_task = None

    def readiness(self) -> dict[str, str]:
        if not self.config.enabled:
            return {}
        if self._key_error:
            return {"assertion_keys": f"fallback: manifest unreadable, using loaded keys ({self._key_error})"}
        try:
            self.ring.active(self.clock())
        except RuntimeError as e:
            return {"assertion_keys": f"down: {e}"}
        return {"assertion_keys": "ok" if self.key_dir else "fallback: ephemeral key"}

    async def _poll_manifest(self) -> None:
        assert self.key_dir is not None
        path = os.path.join(self.key_dir, MANIFEST)
        while True:
            await asyncio.sleep(self.config.manifest_poll_seconds)
            self.refresh_keys(path)

    def refresh_keys(self, path: str | None = None) -> bool:
        """Re-read the key manifest if it changed. Returns True when the key set was replaced."""
        if self.key_dir is None:
            return False
        path = path or os.path.join(self.key_dir, MANIFEST)
        m = manifest_stamp(path)
        if m == self._manifest_mtime:
            return False
        try:
            keys, _ = load_keys(self.key_dir)
        except (OSError, ValueError) as e:  # keep signing with what we have
            self._key_error = type(e).__name__
            log.error("assertion key manifest %s unreadable: %s", path, e)
            return False
        self._key_error = None
        self._manifest_mtime = m
        self.ring = KeyRing(keys, self.key_dir)
        log.info("assertion keys reloaded: %s", ", ".join(k.kid for k in keys))
        return True

    # -- public keys
    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(k.jwk) for k in self.ring.published(self.clock())]}

    # -- per request
    def sign(self, ctx: RequestContext, facts: dict[str, str]) -> str:
        """An ES256 JWT with the request's verified facts.

        One ECDSA signature costs ~50-90 µs, so a signed assertion is reused for the same key,
        route and facts (the principal as verified for this request) while it is younger than
        ``reuse_seconds``; it then still has ``lifetime - reuse`` seconds to live. It carries no
        per-request claim: the request id is the ``X-Request-Id`` header, and the audit record of
        each request names the assertion's ``jti``. Oathkeeper's id_token mutator caches the same
        way."""
        now = self.clock()
        key = self.ring.active(now)
        route = ctx.route
        cache_key = (key.kid, route.name if route is not None else None, *facts.items())
        hit = self._signed.get(cache_key) if self._reuse else None
        if hit is not None and 0 <= now - hit[2] < self._reuse:
            token, jti, _ = hit
        else:
            token, jti = self._sign(key, route, facts, int(now))
            if self._reuse:
                if len(self._signed) >= MAX_SIGNED:  # bounded: many principals only cost signatures
                    self._signed.clear()
                self._signed[cache_key] = (token, jti, int(now))
        ctx.audit["identity"] = {"assertion_jti": jti, "assertion_kid": key.kid}
        return token

    def _sign(self, key: SigningKey, route: Any, facts: dict[str, str], iat: int) -> tuple[str, str]:
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": route.upstream_name if route is not None else "",
            "iat": iat,
            "exp": iat + self._lifetime,
            "jti": jti,
        }
        if route is not None:
            claims["route"] = route.name
            if route.config.service:
                claims["service"] = route.config.service
        claims.update(facts)
        payload = b64url(_claims_json(claims).encode())
        signing_input = f"{key.header_b64}.{payload}"
        der = key.private.sign(signing_input.encode("ascii"), _ES256)
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}", jti
