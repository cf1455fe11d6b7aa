"""The identity forwarder: strips client identity headers and sets the verified ones (a mutator).

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
raw values. The signed assertion it adds: ``assertion.py``; its keys: ``keys.py``.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from gateway.identity.assertion import AssertionSigner
from gateway.identity.config import IdentityConfig
from gateway.identity.keys import KeyRing

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from gateway.chain import BuildEnv
    from gateway.context import RequestContext

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


class Forwarder:
    """Strips and sets the identity headers; adds the signed assertion. Built once per runtime."""

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
        self.assertion = AssertionSigner(config.assertion, key_dir)

    # -- the signer's keys and clock, as the forwarder's
    @property
    def key_dir(self) -> str | None:
        return self.assertion.key_dir

    @property
    def ring(self) -> KeyRing:
        return self.assertion.ring

    @property
    def clock(self) -> Callable[[], float]:
        return self.assertion.clock

    @clock.setter
    def clock(self, fn: Callable[[], float]) -> None:  # tests move time
        self.assertion.clock = fn

    # -- lifecycle
    def adopt(self, previous: Any) -> None:
        """Keep the ephemeral key across reloads (upstreams may have cached it)."""
        if isinstance(previous, Forwarder):
            self.assertion.adopt(previous.assertion)

    async def start(self) -> None:
        await self.assertion.start()

    async def close(self) -> None:
        await self.assertion.close()

    def readiness(self) -> dict[str, str]:
        return self.assertion.readiness()

    def refresh_keys(self, path: str | None = None) -> bool:
        """Re-read the key manifest if it changed. Returns True when the key set was replaced."""
        return self.assertion.refresh_keys(path)

    def jwks(self) -> dict[str, Any]:
        """The assertion keys' JWKS (served by the admin listener)."""
        return self.assertion.jwks()

    # -- per request
    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The identity headers for one request, from verified facts only."""
        route = ctx.route
        if (
            ctx.token is None
            and ctx.integration is None
            and ctx.certificate is None
            and ctx.person is None
            and not ctx.target_org
            and not ctx.acting_org
            and not self.config.assertion.enabled
            and (route is None or not route.config.legal_basis)
        ):
            return {}  # no verified fact and no assertion: nothing to add (e.g. an open route)
        facts = self.facts(ctx)
        n = self.names
        out: dict[str, str] = {}
        for key, suffix in _FACT_HEADERS:
            v = facts.get(key)
            if v:
                out[n[suffix]] = _header_value(v)
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
            out[self.assertion_header] = self.assertion.sign(ctx, facts)
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
        """The signed assertion for this request (``AssertionSigner.sign``)."""
        return self.assertion.sign(ctx, self.facts(ctx) if facts is None else facts)


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


def build_forwarder(env: BuildEnv) -> Forwarder:
    cfg: IdentityConfig = env.config.identity
    key_dir = cfg.assertion.key_dir
    return Forwarder(cfg, env.config.resolve_path(key_dir) if key_dir else None)
