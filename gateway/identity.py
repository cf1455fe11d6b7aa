"""Identity forwarding to the upstream and the signed identity assertion. Config ``identity:``.

The proxy step removes every client-sent header named in ``Forwarder.strip_names`` (names are
compared lower-case with ``_`` read as ``-``), then adds ``Forwarder.headers(ctx)``: values taken
only from facts the chain verified. All headers live under one prefix (default ``X-Portvakt-``):

==========================  ===========================================================
``<p>Consumer-Org``         token ``consumer`` org number (the authenticated organisation)
``<p>Integration-Id``       verified Fiks integration id
``<p>Integration-Org``      the integration's authorised organisation
``<p>Certificate-Org``      enterprise client certificate org number
``<p>Scope``                token scopes, space-separated, sorted
``<p>Acr``                  ID-porten ``acr``
``<p>Client-Amr``           Maskinporten ``client_amr``
``<p>Target-Org``           the organisation the request concerns
``<p>Legal-Basis``          the route's legal basis
``<p>Person``               the person's pid: only where the route sets ``forward.person``
``<p>Amr``                  a logged-in person's ``amr`` (filters.persons), space-separated
``<p>Auth-Time``            when that person authenticated (Unix seconds)
``<p>Session``              the login session id, hashed
``<p>Acting-Org``           the organisation a logged-in person acts for (``party:`` routes)
``<p>Assertion``            the signed identity assertion (ES256 JWT, below)
``Client-Cert`` (+``-Chain``) RFC 9440, only where the route sets ``forward.client_cert``
``Authorization``           the verified bearer token, only where the route sets ``forward.bearer_token``
==========================  ===========================================================

Consumed credentials stay at the gate: ``Authorization`` (any scheme) and the Fiks integration
headers (``IntegrasjonId``/``IntegrasjonPassord`` in any case, with ``-`` or ``_``) are stripped
on every route; the signed assertion is how the upstream learns who called.

Values outside printable ASCII (and ``%``) are percent-encoded UTF-8; the assertion carries the
raw values. The assertion's claims: ``iss`` (``identity.assertion.issuer``), ``aud`` (the
upstream's name), ``iat``, ``exp`` (``iat + lifetime_seconds``), ``jti``, ``request_id``,
``route``, ``service`` and, when known, ``consumer_org``, ``integration_id``,
``integration_org``, ``certificate_org``, ``scope``, ``acr``, ``client_amr``, ``token_kind``,
``target_org``, ``legal_basis``, for a logged-in person ``amr``, ``auth_time`` and ``session``, and
(opt-in routes only) ``pid``. The public keys are served as a
JWKS by the admin listener at ``/.well-known/jwks.json`` (``Forwarder.jwks()``).

Keys: ``identity.assertion.key_dir`` holds PEM keys and ``manifest.json`` managed by
``portvakt assertion-keys create|rotate|prune DIR``. ``rotate`` adds a key whose
``not_before_signing`` lies ``--publish-delay`` in the future: it is published in the JWKS at
once (after the gateway re-reads the manifest, which it polls) and used for signing only from
then on; the previous key gets ``retire_at = not_before_signing(new) + max_lifetime`` and stays
in the JWKS until then; ``prune`` deletes retired keys. Without a key dir, the gateway makes an
ephemeral P-256 key at start (kept across reloads, lost at restart): fine for the demo only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pydantic import Field, field_validator

from gateway.configbase import Model

if TYPE_CHECKING:  # pragma: no cover
    from gateway.chain import BuildEnv
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.identity")

MANIFEST = "manifest.json"
DEFAULT_MAX_LIFETIME = 300  # seconds a manifest promises no assertion outlives
DEFAULT_PUBLISH_DELAY = 300


class AssertionConfig(Model):
    enabled: bool = Field(True, description="Send the signed identity assertion header")
    header: str = Field("Assertion", description="Header name after the prefix")
    issuer: str = Field("portvakt", description="The assertion's iss claim")
    lifetime_seconds: int = Field(60, ge=1, le=3600, description="exp - iat of each assertion")
    reuse_seconds: int | None = Field(
        None,
        ge=0,
        description="How long one signed assertion serves further requests with the same verified "
        "facts, route and key (default: half the lifetime, so a reused one has at least that left; at most "
        "lifetime - 1; 0: sign per request). The per-request id travels in X-Request-Id, not in the assertion",
    )
    key_dir: str | None = Field(
        None, description="Directory managed by `portvakt assertion-keys`; absent: ephemeral key"
    )
    manifest_poll_seconds: float = Field(
        5.0, ge=0, description="How often the manifest is re-read for rotations (0: only at load)"
    )


class IdentityConfig(Model):
    header_prefix: str = Field("X-Portvakt-", description="Prefix of every identity header Portvakt sets")
    assertion: AssertionConfig = Field(default_factory=AssertionConfig)
    strip_extra: list[str] = Field(
        default_factory=list, description="More client header names always removed (legacy identity headers)"
    )

    @field_validator("header_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("letters, digits, '-' or '_' only")
        return v


class RouteForwardConfig(Model):
    person: bool = Field(False, description="Forward the person's identity (pid) to this upstream")
    client_cert: bool = Field(False, description="Forward the client certificate as RFC 9440 Client-Cert")
    bearer_token: bool = Field(
        False,
        description="Pass the verified bearer token on as Authorization (default: stripped). For an upstream that "
        "must call further APIs with the caller's token or re-checks it itself; the token then leaves the gate and "
        "can be replayed by the upstream until it expires. An unverified token is never forwarded",
    )


# Client headers holding credentials the gateway checks (normalised: lower case, "_" as "-"):
# stripped on every route. Authorization covers every scheme: one Portvakt cannot verify (Basic,
# Digest...) would otherwise reach the upstream unchecked.
CONSUMED_CREDENTIALS = frozenset(
    {"authorization", "integrasjonid", "integrasjon-id", "integrasjonpassord", "integrasjon-passord"}
)

# Header suffixes (after the prefix) in the order they are documented.
SUFFIXES = (
    "Consumer-Org",
    "Integration-Id",
    "Integration-Org",
    "Certificate-Org",
    "Scope",
    "Acr",
    "Client-Amr",
    "Target-Org",
    "Legal-Basis",
    "Person",
    "Amr",
    "Auth-Time",
    "Session",
    "Acting-Org",
)


def normalize_header_name(name: str) -> str:
    """The form strip_names uses: lower case, ``_`` read as ``-``."""
    return name.lower().replace("_", "-")


# Built once: json.dumps with non-default options builds a new encoder per call (about 5 µs), and
# the ECDSA algorithm object costs about 3 µs to make; both are immutable.
_claims_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ES256 = ec.ECDSA(hashes.SHA256())


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _header_value(v: str) -> str:
    """Printable ASCII passes; anything else (and '%') is percent-encoded UTF-8."""
    if v.isascii() and v.isprintable() and "%" not in v:  # printable ASCII: 0x20-0x7E
        return v
    out = []
    for c in v:
        if " " <= c <= "~" and c != "%":
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


# --------------------------------------------------------------------------------------- keys


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
        "x": _b64url(n.x.to_bytes(32, "big")),
        "y": _b64url(n.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the key id."""
    canon = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canon.encode()).digest())


def make_signing_key(
    private: ec.EllipticCurvePrivateKey, nbs: float = 0.0, retire_at: float | None = None
) -> SigningKey:
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError("assertion keys must be EC P-256 (ES256)")
    jwk = _jwk(private.public_key())
    kid = thumbprint(jwk)
    jwk = {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}
    header = json.dumps({"alg": "ES256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode()
    return SigningKey(kid, private, nbs, retire_at, jwk, _b64url(header))


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


# ---------------------------------------------------------------------------------- forwarder


class Forwarder:
    """Strips and sets the identity headers; signs the assertion. Built once per runtime."""

    def __init__(self, config: IdentityConfig, key_dir: str | None):
        self.config = config
        p = config.header_prefix
        self.prefix = p
        self.names = {s: p + s for s in SUFFIXES}
        self.assertion_header = p + config.assertion.header
        strip = {normalize_header_name(n) for n in self.names.values()}
        strip.add(normalize_header_name(self.assertion_header))
        strip.update({"client-cert", "client-cert-chain"})
        # Credentials the gateway consumed never travel on: the upstream gets the verified facts
        # (the headers and the signed assertion). A route may opt in to the verified bearer token
        # (forward.bearer_token, re-added in headers()); any other Authorization is never forwarded.
        strip.update(CONSUMED_CREDENTIALS)
        strip.update(normalize_header_name(n) for n in config.strip_extra)
        self.strip_names: frozenset[str] = frozenset(strip)
        # Anything under our prefix is ours, even a name we do not set today.
        self.strip_prefixes: tuple[str, ...] = (normalize_header_name(p),)
        self.key_dir = key_dir
        self._lifetime = config.assertion.lifetime_seconds
        reuse = config.assertion.reuse_seconds
        # A reused assertion keeps at least a second to live (lifetime - reuse).
        self._reuse = self._lifetime // 2 if reuse is None else max(0, min(reuse, self._lifetime - 1))
        # (kid, route, facts) -> (token, jti, iat): one signature per principal and window.
        self._signed: dict[tuple[Any, ...], tuple[str, str, int]] = {}
        self._issuer = config.assertion.issuer
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
            self._manifest_mtime = _mtime(os.path.join(key_dir, MANIFEST))
            self.ring = KeyRing(keys, key_dir)
        else:
            self.ring = KeyRing([make_signing_key(ec.generate_private_key(ec.SECP256R1()))], None)

    # -- lifecycle
    def adopt(self, previous: Any) -> None:
        """Keep the ephemeral key across reloads (upstreams may have cached it)."""
        if self.key_dir is None and isinstance(previous, Forwarder) and previous.key_dir is None:
            self.ring = previous.ring

    async def start(self) -> None:
        if self.key_dir is not None and self.config.assertion.manifest_poll_seconds > 0:
            self._poll_task = asyncio.create_task(self._poll_manifest(), name="assertion-key-poll")
        if self.key_dir is None and self.config.assertion.enabled:
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
        if not self.config.assertion.enabled:
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
            await asyncio.sleep(self.config.assertion.manifest_poll_seconds)
            self.refresh_keys(path)

    def refresh_keys(self, path: str | None = None) -> bool:
        """Re-read the key manifest if it changed. Returns True when the key set was replaced."""
        if self.key_dir is None:
            return False
        path = path or os.path.join(self.key_dir, MANIFEST)
        m = _mtime(path)
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
    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The identity headers for one request, from verified facts only."""
        facts = self.facts(ctx)
        n = self.names
        out: dict[str, str] = {}
        for key, suffix in _FACT_HEADERS:
            v = facts.get(key)
            if v:
                out[n[suffix]] = _header_value(v)
        route = ctx.route
        if route is not None and route.config.forward.bearer_token and ctx.token is not None:
            # ctx.token is set only after the one Authorization header verified (and bound).
            auth = ctx.headers.get("Authorization")
            if auth is not None:
                out["Authorization"] = auth
        if (
            route is not None
            and route.config.forward.client_cert
            and ctx.certificate is not None
            and ctx.certificate.der
        ):
            out["Client-Cert"] = ":" + base64.b64encode(ctx.certificate.der).decode() + ":"
            if ctx.certificate.source == "tls" and len(ctx.tls.peer_chain_der) > 1:
                out["Client-Cert-Chain"] = ", ".join(
                    ":" + base64.b64encode(d).decode() + ":" for d in ctx.tls.peer_chain_der[1:]
                )
        if self.config.assertion.enabled:
            out[self.assertion_header] = self.sign(ctx, facts)
        return out

    def facts(self, ctx: RequestContext) -> dict[str, str]:
        f: dict[str, str] = {}
        t = ctx.token
        if t is not None:
            f["token_kind"] = t.kind
            if t.consumer_org:
                f["consumer_org"] = t.consumer_org
            if t.scopes:
                f["scope"] = " ".join(sorted(t.scopes))
            if t.acr:
                f["acr"] = t.acr
            if t.client_amr:
                f["client_amr"] = t.client_amr
        if ctx.integration is not None:
            f["integration_id"] = ctx.integration.id
            f["integration_org"] = ctx.integration.authorized_org
        if ctx.certificate is not None and ctx.certificate.org_number:
            f["certificate_org"] = ctx.certificate.org_number
        if ctx.target_org:
            f["target_org"] = ctx.target_org
        route = ctx.route
        if route is not None:
            if route.config.legal_basis:
                f["legal_basis"] = route.config.legal_basis
            if route.config.forward.person and t is not None and t.pid:
                f["pid"] = t.pid
        p = ctx.person  # a logged-in person (filters.persons): how and when they authenticated
        if p is not None:
            if p.amr:
                f["amr"] = " ".join(p.amr)
            if p.auth_time is not None:
                f["auth_time"] = str(int(p.auth_time))
            f["session"] = p.session
        if ctx.acting_org:  # the party the person chose (filters.delegation), re-checked this request
            f["acting_org"] = ctx.acting_org
        return f

    def sign(self, ctx: RequestContext, facts: dict[str, str] | None = None) -> str:
        """An ES256 JWT with the request's verified facts.

        One ECDSA signature costs ~50-90 µs, so a signed assertion is reused for the same key,
        route and facts (the principal as verified for this request) while it is younger than
        ``reuse_seconds``; it then still has ``lifetime - reuse`` seconds to live. It carries no
        per-request claim: the request id is the ``X-Request-Id`` header, and the audit record of
        each request names the assertion's ``jti``. Oathkeeper's id_token mutator caches the same
        way."""
        now = self.clock()
        key = self.ring.active(now)
        if facts is None:
            facts = self.facts(ctx)
        route = ctx.route
        cache_key = (key.kid, route.name if route is not None else None, *facts.items())
        hit = self._signed.get(cache_key) if self._reuse else None
        if hit is not None and 0 <= now - hit[2] < self._reuse:
            token, jti, _ = hit
        else:
            token, jti = self._sign(key, route, facts, int(now))
            if self._reuse:
                if len(self._signed) >= _MAX_SIGNED:  # bounded: many principals only cost signatures
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
        payload = _b64url(_claims_json(claims).encode())
        signing_input = f"{key.header_b64}.{payload}"
        der = key.private.sign(signing_input.encode("ascii"), _ES256)
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}", jti


_MAX_SIGNED = 10_000

_FACT_HEADERS = (
    ("consumer_org", "Consumer-Org"),
    ("integration_id", "Integration-Id"),
    ("integration_org", "Integration-Org"),
    ("certificate_org", "Certificate-Org"),
    ("scope", "Scope"),
    ("acr", "Acr"),
    ("client_amr", "Client-Amr"),
    ("target_org", "Target-Org"),
    ("legal_basis", "Legal-Basis"),
    ("pid", "Person"),
    ("amr", "Amr"),
    ("auth_time", "Auth-Time"),
    ("session", "Session"),
    ("acting_org", "Acting-Org"),
)


def _mtime(path: str) -> tuple[int, int, int] | None:
    """A change stamp: the manifest is replaced atomically, so the inode changes too."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def build_forwarder(env: BuildEnv) -> Forwarder:
    cfg: IdentityConfig = env.config.identity
    key_dir = cfg.assertion.key_dir
    return Forwarder(cfg, env.config.resolve_path(key_dir) if key_dir else None)


# ----------------------------------------------------------------------------- key management


def _write_json_atomic(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_key_file(key_dir: str) -> tuple[str, str]:
    priv = ec.generate_private_key(ec.SECP256R1())
    kid = make_signing_key(priv).kid
    name = f"{kid}.pem"
    pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(os.path.join(key_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return kid, name


def keys_create(key_dir: str, max_lifetime: int = DEFAULT_MAX_LIFETIME, now: float | None = None) -> str:
    """Create a key directory with one key usable at once. Returns its kid."""
    now = time.time() if now is None else now
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(key_dir, MANIFEST)):
        raise FileExistsError(f"{key_dir}/{MANIFEST} exists: use rotate")
    kid, name = _new_key_file(key_dir)
    doc = {
        "max_lifetime": max_lifetime,
        "keys": [{"kid": kid, "file": name, "created": now, "not_before_signing": now, "retire_at": None}],
    }
    _write_json_atomic(os.path.join(key_dir, MANIFEST), doc)
    return kid


def keys_rotate(key_dir: str, publish_delay: float = DEFAULT_PUBLISH_DELAY, now: float | None = None) -> str:
    """Add a key published now and used for signing from ``now + publish_delay``. Every key in
    use until then retires ``max_lifetime`` after that moment. Returns the new kid."""
    now = time.time() if now is None else now
    path = os.path.join(key_dir, MANIFEST)
    doc = read_manifest(key_dir)
    max_lifetime = int(doc.get("max_lifetime", DEFAULT_MAX_LIFETIME))
    kid, name = _new_key_file(key_dir)
    takeover = now + publish_delay
    for e in doc["keys"]:
        if e["not_before_signing"] >= takeover:  # a pending key overtaken before it ever signed
            e["retire_at"] = min(e.get("retire_at") or now, now)
            continue
        # Keys that would still sign before the new one takes over: they retire after the last
        # assertion they can have signed has expired.
        if e.get("retire_at") is None or e["retire_at"] > takeover + max_lifetime:
            e["retire_at"] = takeover + max_lifetime
    doc["keys"].append(
        {"kid": kid, "file": name, "created": now, "not_before_signing": takeover, "retire_at": None}
    )
    _write_json_atomic(path, doc)
    return kid


def keys_prune(key_dir: str, now: float | None = None) -> list[str]:
    """Delete keys whose retire time has passed. Returns their kids."""
    now = time.time() if now is None else now
    doc = read_manifest(key_dir)
    keep, gone = [], []
    for e in doc["keys"]:
        (gone if e.get("retire_at") is not None and e["retire_at"] <= now else keep).append(e)
    doc["keys"] = keep
    _write_json_atomic(os.path.join(key_dir, MANIFEST), doc)
    for e in gone:
        try:
            os.unlink(os.path.join(key_dir, e["file"]))
        except FileNotFoundError:
            pass
    return [e["kid"] for e in gone]


def _cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.keys_action == "create":
            kid = keys_create(args.dir, max_lifetime=args.max_lifetime)
            print(f"created {kid} (signing now)")
        elif args.keys_action == "rotate":
            kid = keys_rotate(args.dir, publish_delay=args.publish_delay)
            print(f"added {kid}: published now, signing from {time.time() + args.publish_delay:.0f}")
        elif args.keys_action == "prune":
            gone = keys_prune(args.dir)
            print("pruned " + (", ".join(gone) if gone else "nothing"))
        else:  # list
            doc = read_manifest(args.dir)
            print(json.dumps(doc, indent=2, sort_keys=True))
    except (OSError, ValueError) as e:
        print(f"portvakt assertion-keys: {e}", file=sys.stderr)
        return 1
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``portvakt assertion-keys create|rotate|prune|list DIR`` to the CLI."""
    p = subparsers.add_parser("assertion-keys", help="Create and rotate the identity assertion signing keys")
    sub = p.add_subparsers(dest="keys_action", required=True)
    c = sub.add_parser("create", help="Create a key directory with its first key")
    c.add_argument("dir")
    c.add_argument(
        "--max-lifetime",
        type=int,
        default=DEFAULT_MAX_LIFETIME,
        help="Longest assertion lifetime any gateway using these keys may configure (seconds)",
    )
    r = sub.add_parser("rotate", help="Publish a new key now; sign with it after the publish delay")
    r.add_argument("dir")
    r.add_argument("--publish-delay", type=float, default=DEFAULT_PUBLISH_DELAY, help="Seconds (default 300)")
    pr = sub.add_parser("prune", help="Delete keys whose last assertion has expired")
    pr.add_argument("dir")
    ls = sub.add_parser("list", help="Print the manifest")
    ls.add_argument("dir")
    for sp in (c, r, pr, ls):
        sp.set_defaults(func=_cmd_keys)
