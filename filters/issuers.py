"""Bearer token validation (Maskinporten, ID-porten). Config section ``issuers:``.

The filter ``tokens`` runs on every route, public ones too: a bearer token that is presented is
verified (a forged, expired or foreign one answers 401 even where no credential is required), and
the proxy never forwards it (``gateway.identity``: consumed credentials stay at the gate unless a
route sets ``forward.bearer_token``). ``Authorization:
Bearer <jwt>`` is parsed strictly (one header, a compact JWS of three base64url parts); no
Authorization header, or another scheme, is not this filter's business (Skip). The token's
unverified ``iss`` only selects which issuer config (and key set) to verify against; nothing in the
token header chooses keys: ``jku``, ``x5u``, ``jwk`` and ``x5c`` are ignored, ``alg`` must be one of
the issuer's asymmetric algorithms and fit the key's type, and any ``crit`` is refused.

A verified token becomes ``ctx.token`` (``gateway.context.TokenIdentity``) and is cached by the
SHA-256 of the token until its ``exp`` but never longer than ``max_token_lifetime_seconds`` from
its verification (bounded LRU), so a client reusing its token costs one dict
lookup per request. Every failure answers the same 401 ``invalid_token`` with
``WWW-Authenticate: Bearer error="invalid_token"``; the precise reason (``token_expired``,
``token_bad_signature``...) goes to ``internal_reason`` for audit, log and metrics. An issuer whose
keys were never obtained answers 503 ``issuer_keys_unavailable``.

Whose token it is: every issuer names its ``audience`` (one value or several; one of them must
be in the token's ``aud``). ID-porten issuers must; a Maskinporten issuer may instead say
``tokens_without_audience: bound_by_scope`` (its tokens often carry no ``aud``), and then only a
token *without* ``aud`` is accepted on scope alone; one that names another audience is refused.
Access tokens are told apart from id_tokens (``_is_access_token``): a JOSE ``typ`` other than
``JWT``/``at+jwt`` is refused (``require_typ_at_jwt`` demands RFC 9068 ``at+jwt``), and so is any
token carrying an id_token claim (``nonce``, ``at_hash``, ``c_hash``, ``s_hash``) or whose ``aud``
is its own ``client_id``/``azp``. Binding (``binding_problem``, checked on every request, cache
hits too): ``cnf.x5t#S256`` must be the client certificate's thumbprint (RFC 8705), and a client
certificate's org must be the token's consumer (or supplier) org unless the route's
``access.allow_certificate_org_mismatch`` relaxes it.

``acr_rank(acr)`` orders ID-porten levels for the route policy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import Counter
from pydantic import Field, field_validator, model_validator

from filters.jwks import VERIFIERS, JwksStore, KeysUnavailable, VerifyKey, check_algorithms, check_jwks_uri
from gateway import problems
from gateway.chain import (
    ALLOW,
    SKIP,
    BuildEnv,
    Decision,
    Deny,
    Filter,
    Mode,
    Stage,
)
from gateway.configbase import Model
from gateway.context import Detection, RequestContext, TokenIdentity
from gateway.metrics import REGISTRY
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig


class IssuerConfig(Model):
    kind: Literal["maskinporten", "idporten"] = Field(description="What shape of token this issuer mints")
    issuer: str = Field(
        description="Exact `iss` value (Maskinporten: with trailing slash; ID-porten: without)"
    )
    jwks_uri: str | None = Field(None, description="Where the issuer publishes its keys (https)")
    jwks_file: str | None = Field(
        None, description="A JWKS file instead of jwks_uri (air-gapped setups, tests)"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512"],
        description="Accepted `alg` values: RS*, PS*, ES* only (never HMAC or none)",
    )
    audience: str | list[str] | None = Field(
        None,
        description="Who this issuer's tokens must be for: one `aud` value or several (any one must be in the "
        "token's `aud`). Required for idporten; for maskinporten unless tokens_without_audience: bound_by_scope",
    )
    tokens_without_audience: Literal["refuse", "bound_by_scope"] = Field(
        "refuse",
        description="maskinporten only: bound_by_scope accepts tokens that carry no `aud` at all (Maskinporten "
        "issues such tokens unless the client asks for an audience); only the route's required scopes then bind "
        "them to this API. A token that carries an `aud` must still match `audience`. check-config warns",
    )
    require_typ_at_jwt: bool = Field(
        False,
        description="Accept only tokens whose JOSE `typ` is at+jwt (RFC 9068): for issuers that mark every access token",
    )
    leeway_seconds: int = Field(30, ge=0, le=600, description="Clock skew tolerated on exp, nbf and iat")
    max_token_lifetime_seconds: int | None = Field(
        3600,
        ge=1,
        description="Refuse tokens living longer (exp - iat, or exp - now beyond the leeway; reason "
        "token_lifetime_too_long) and cache none longer than this. Maskinporten and ID-porten access tokens "
        "live 120 s by default; null: no bound",
    )
    jwks_cache_seconds: int = Field(3600, gt=0, description="Age after which the key set is refreshed")
    jwks_refetch_min_seconds: float = Field(
        30.0, ge=0, description="At most one on-demand refetch (unknown kid) per this many seconds"
    )
    jwks_timeout_seconds: float = Field(5.0, gt=0, le=60, description="Total time allowed for one JWKS fetch")
    jwks_retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest backoff between retries while the keys were never obtained"
    )
    mode: Mode = Field(
        Mode.enforce, description="off: tokens from this issuer are ignored; detect: failures only recorded"
    )

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        return check_algorithms(v)

    @field_validator("jwks_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_jwks_uri(v)

    @field_validator("audience")
    @classmethod
    def _audience(cls, v: str | list[str] | None) -> str | list[str] | None:
        values = [v] if isinstance(v, str) else v
        if values is not None and (not values or any(not a.strip() for a in values)):
            raise ValueError("must name at least one non-empty audience")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> IssuerConfig:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_uri and jwks_file")
        if self.kind == "idporten":
            if self.tokens_without_audience != "refuse":
                raise ValueError("tokens_without_audience: bound_by_scope is for maskinporten only")
            if self.audience is None:
                raise ValueError(
                    "audience is required for an idporten issuer: without it a token issued for another API "
                    "(or an id_token of another client) would be accepted"
                )
        elif self.audience is None and self.tokens_without_audience != "bound_by_scope":
            raise ValueError(
                "set audience (who this API is, as the issuer writes it in `aud`), or say explicitly that scope "
                "alone binds this issuer's tokens: tokens_without_audience: bound_by_scope"
            )
        return self

    @property
    def audiences(self) -> frozenset[str]:
        a = self.audience
        return frozenset() if a is None else frozenset([a] if isinstance(a, str) else a)


# -- reasons ---------------------------------------------------------------------------------

INVALID_TOKEN = problems.register("invalid_token", 401, "Invalid access token")
KEYS_UNAVAILABLE = problems.register("issuer_keys_unavailable", 503, "Token issuer keys unavailable")

# Internal reasons (audit, log, metrics): never shown to the client.
TOKEN_MALFORMED = "token_malformed"
TOKEN_UNKNOWN_ISSUER = "token_unknown_issuer"
TOKEN_ALG_NOT_ALLOWED = "token_alg_not_allowed"
TOKEN_CRIT_UNSUPPORTED = "token_crit_unsupported"
TOKEN_UNKNOWN_KID = "token_unknown_kid"
TOKEN_BAD_SIGNATURE = "token_bad_signature"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
TOKEN_BAD_AUDIENCE = "token_bad_audience"
TOKEN_CLAIMS_INVALID = "token_claims_invalid"
TOKEN_KIND_MISMATCH = "token_kind_mismatch"
TOKEN_NOT_ACCESS_TOKEN = "token_not_access_token"  # an id_token (or another JWT type) offered as access token
TOKEN_CERTIFICATE_ORG_MISMATCH = "token_certificate_org_mismatch"  # client cert names another organisation
TOKEN_CNF_MISMATCH = "token_cnf_mismatch"  # cnf.x5t#S256 does not name the client certificate (RFC 8705)
TOKEN_LIFETIME_TOO_LONG = (
    "token_lifetime_too_long"  # exp - iat (or exp - now) above max_token_lifetime_seconds
)
INTERNAL_REASONS = (
    TOKEN_MALFORMED,
    TOKEN_UNKNOWN_ISSUER,
    TOKEN_ALG_NOT_ALLOWED,
    TOKEN_CRIT_UNSUPPORTED,
    TOKEN_UNKNOWN_KID,
    TOKEN_BAD_SIGNATURE,
    TOKEN_EXPIRED,
    TOKEN_NOT_YET_VALID,
    TOKEN_BAD_AUDIENCE,
    TOKEN_CLAIMS_INVALID,
    TOKEN_KIND_MISMATCH,
    TOKEN_NOT_ACCESS_TOKEN,
    TOKEN_CERTIFICATE_ORG_MISMATCH,
    TOKEN_CNF_MISMATCH,
    TOKEN_LIFETIME_TOO_LONG,
)

VERIFICATIONS = Counter(
    "portvakt_token_verifications_total",
    "Bearer tokens checked: verified (signature checked now), cache_hit, failed",
    ["result"],
    registry=REGISTRY,
)
_VERIFIED = VERIFICATIONS.labels("verified")
_CACHE_HIT = VERIFICATIONS.labels("cache_hit")
_FAILED = VERIFICATIONS.labels("failed")

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_DETAIL = "The bearer token is not valid."

# -- ID-porten levels ------------------------------------------------------------------------

ACR_RANKS: dict[str, int] = {
    "idporten-loa-low": 1,
    "Level2": 1,
    "idporten-loa-substantial": 2,
    "Level3": 2,
    "idporten-loa-high": 3,
    "Level4": 3,
}


def acr_rank(acr: str | None) -> int:
    """Order of an ID-porten ``acr``: low 1 < substantial/Level3 2 < high/Level4 3; unknown or
    absent 0 (below every level, so it never satisfies a requirement)."""
    return ACR_RANKS.get(acr, 0) if acr else 0


# -- parsing helpers -------------------------------------------------------------------------

MAX_TOKEN_CHARS = 16384
CACHE_MAX_ENTRIES = 10_000
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)", re.ASCII)
_ORG = re.compile(r"[0-9]{9}", re.ASCII)
_PID = re.compile(r"[0-9]{11}", re.ASCII)


def _now() -> float:
    """Wall-clock seconds (a seam for tests)."""
    return time.time()


class _Malformed(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate member names make a JSON object mean different things to different parsers.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Malformed(f"duplicate member {k!r}")
        out[k] = v
    return out


def _b64(seg: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        raise _Malformed("bad base64url") from None


def _json_object(seg: str) -> dict[str, Any]:
    try:
        obj = json.loads(_b64(seg), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError):
        raise _Malformed("bad JSON") from None
    if not isinstance(obj, dict):
        raise _Malformed("not a JSON object")
    return obj


def _is_time(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


class _ClaimsError(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _org_of(party: Any, what: str) -> tuple[str, str | None]:
    """(raw ID, org number or None) of a Maskinporten ``consumer``/``supplier`` object."""
    if not isinstance(party, dict) or not isinstance(party.get("ID"), str):
        raise _ClaimsError(TOKEN_CLAIMS_INVALID)
    ident = party["ID"]
    if ident.startswith("0192:"):
        org = ident[5:]
        if not _ORG.fullmatch(org):
            raise _ClaimsError(TOKEN_CLAIMS_INVALID)
        return ident, org
    return ident, None  # another ISO 6523 authority: kept as-is, no Norwegian org number


def _str_or_none(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise _ClaimsError(TOKEN_CLAIMS_INVALID)


def _scopes(v: Any) -> frozenset[str]:
    if v is None:
        return frozenset()
    if not isinstance(v, str):
        raise _ClaimsError(TOKEN_CLAIMS_INVALID)
    return frozenset(s for s in v.split(" ") if s)


def _str_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise _ClaimsError(TOKEN_CLAIMS_INVALID)


_ACCESS_TYPS = frozenset({"jwt", "at+jwt", "application/at+jwt"})
_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
# Claims only an OpenID Connect id_token carries (OIDC Core 2, 3.1.3.6, 3.3.2.11): never an access token's.
ID_TOKEN_MARKERS = ("nonce", "at_hash", "c_hash", "s_hash")


def _is_access_token(
    header: dict[str, Any], claims: dict[str, Any], auds: tuple[str, ...], require_at_jwt: bool
) -> bool:
    """Whether a verified JWT is an access token and not an id_token (or a logout token, an
    assertion...). RFC 9068: a JOSE ``typ`` other than JWT / at+jwt is another kind of token, and
    ``require_at_jwt`` demands at+jwt. Whatever the ``typ`` says, a token carrying an id_token
    claim (``nonce``, ``at_hash``, ``c_hash``, ``s_hash``) or whose audience is its own client
    (``client_id``/``azp`` in ``aud``: an id_token is addressed to the client that logged in) is
    refused."""
    typ = header.get("typ")
    if typ is not None:
        if not isinstance(typ, str) or typ.lower() not in _ACCESS_TYPS:
            return False
    if require_at_jwt and (not isinstance(typ, str) or typ.lower() not in _AT_JWT):
        return False
    if any(name in claims for name in ID_TOKEN_MARKERS):
        return False
    for name in ("client_id", "azp"):
        client = claims.get(name)
        if isinstance(client, str) and client in auds:
            return False
    return True


def _cnf_thumbprint(claims: dict[str, Any]) -> str | None:
    """The token's ``cnf.x5t#S256`` (RFC 8705 3.1), or None when the token is not certificate-bound.
    Raises _ClaimsError for a ``cnf`` that is present but not shaped as RFC 7800 says."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise _ClaimsError(TOKEN_CLAIMS_INVALID)
    x5t = cnf.get("x5t#S256")
    if x5t is None:
        if cnf:  # a confirmation method we cannot check (jkt: DPoP, jwk...): fail closed
            raise _ClaimsError(TOKEN_CNF_MISMATCH)
        return None
    if not isinstance(x5t, str) or not x5t:
        raise _ClaimsError(TOKEN_CLAIMS_INVALID)
    return x5t


def identity_from_claims(kind: str, issuer_name: str, claims: dict[str, Any]) -> TokenIdentity:
    """Verified claims -> TokenIdentity. Raises _ClaimsError when the token is not shaped like a
    token of ``kind`` (Maskinporten needs ``consumer``; ID-porten needs ``pid``)."""
    common = dict(
        kind=kind,
        issuer=issuer_name,
        iss=claims["iss"],
        exp=int(claims["exp"]),
        scopes=_scopes(claims.get("scope")),
        client_id=_str_or_none(claims.get("client_id")),
        jti=_str_or_none(claims.get("jti")),
        cnf_x5t_s256=_cnf_thumbprint(claims),
    )
    if kind == "maskinporten":
        if "consumer" not in claims:
            raise _ClaimsError(TOKEN_KIND_MISMATCH)
        consumer, consumer_org = _org_of(claims["consumer"], "consumer")
        supplier_org = None
        if claims.get("supplier") is not None:
            _, supplier_org = _org_of(claims["supplier"], "supplier")
        client_amr = claims.get("client_amr")
        if isinstance(client_amr, list):
            client_amr = " ".join(_str_list(client_amr)) or None
        return TokenIdentity(
            consumer=consumer,
            consumer_org=consumer_org,
            supplier_org=supplier_org,
            client_amr=_str_or_none(client_amr),
            **common,
        )
    pid = claims.get("pid")
    if pid is None:
        raise _ClaimsError(TOKEN_KIND_MISMATCH)
    if not isinstance(pid, str) or not _PID.fullmatch(pid):
        raise _ClaimsError(TOKEN_CLAIMS_INVALID)
    return TokenIdentity(
        pid=pid, acr=_str_or_none(claims.get("acr")), amr=_str_list(claims.get("amr")), **common
    )


# -- runtime ---------------------------------------------------------------------------------


@dataclass(slots=True)
class IssuerRuntime:
    name: str
    config: IssuerConfig
    lease: Lease[JwksStore]  # the key store, kept across reloads while its source is the same
    algorithms: frozenset[str]
    audiences: frozenset[str] = frozenset()
    store: JwksStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = self.lease.resource

    @property
    def mode(self) -> Mode:
        return self.config.mode


@dataclass(slots=True, frozen=True)
class _Cached:
    identity: TokenIdentity
    issuer: IssuerRuntime
    kid: str
    valid_until: float  # exp + leeway (wall clock)
    audit: dict[str, Any]


class TokensFilter(Filter):
    name = "tokens"

    def __init__(self, stage: TokensStage, mode: Mode) -> None:
        self.stage = stage
        self.mode = mode

    async def check(self, ctx: RequestContext) -> Decision:
        decision = await self._verify(ctx)
        token = ctx.token
        if decision is ALLOW and token is not None:
            reason = binding_problem(ctx, token)
            if reason is not None:
                ctx.token = None  # not this connection's token: nothing downstream may use it
                decision = self.stage.fail(ctx, self.stage.issuers.get(token.issuer), reason)
                if decision is SKIP:  # this issuer only detects
                    ctx.token = token
        return decision

    async def _verify(self, ctx: RequestContext) -> Decision:
        values = ctx.headers.getall("Authorization", ())
        if not values:
            return SKIP
        if len(values) != 1:
            return self.stage.fail(ctx, None, TOKEN_MALFORMED)
        value = values[0]
        stage = self.stage
        digest = None
        if value[6:7] == " " and value[:6].lower() == "bearer" and value.isascii():
            # Fast path: a token verified before (the cache only holds tokens that passed the
            # strict parse below, so a hit needs no regex).
            digest = hashlib.sha256(value[7:].encode("ascii")).digest()
            if stage.from_cache(ctx, digest):
                return ALLOW
        m = _BEARER.fullmatch(value) if len(value) <= MAX_TOKEN_CHARS else None
        if m is None:
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != "bearer":
                return SKIP  # another scheme (Basic...) is not a bearer token
            return self.stage.fail(ctx, None, TOKEN_MALFORMED)
        token = m.group(1)
        return await stage.verify(ctx, token, digest or hashlib.sha256(token.encode("ascii")).digest())


def binding_problem(ctx: RequestContext, token: TokenIdentity) -> str | None:
    """Why a verified token may not be used on this connection, or None.

    - ``cnf.x5t#S256`` (RFC 8705): the token is bound to one client certificate; the request's
      client certificate (TLS, or forwarded by a trusted proxy) must have that SHA-256 thumbprint.
    - A client certificate and a Maskinporten token both name an organisation: they must agree
      (the certificate's org is the token's consumer, or the supplier acting for it), unless the
      route sets ``access.allow_certificate_org_mismatch``.
    """
    cert = ctx.certificate
    if token.cnf_x5t_s256 is not None:
        if cert is None or not cert.der:
            return TOKEN_CNF_MISMATCH
        got = base64.urlsafe_b64encode(hashlib.sha256(cert.der).digest()).rstrip(b"=").decode("ascii")
        if not hmac.compare_digest(got, token.cnf_x5t_s256):
            return TOKEN_CNF_MISMATCH
    if cert is not None and cert.org_number and token.consumer_org and cert.org_number != token.consumer_org:
        if cert.org_number == token.supplier_org:
            return None
        route = ctx.route
        access = route.config.access if route is not None else None
        if access is None or not access.allow_certificate_org_mismatch:
            return TOKEN_CERTIFICATE_ORG_MISMATCH
    return None


class TokensStage(Stage):
    name = "tokens"

    def __init__(self, issuers: dict[str, IssuerRuntime]) -> None:
        self.issuers = issuers
        self._by_iss = {rt.config.issuer: rt for rt in issuers.values()}
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self.cache_max = CACHE_MAX_ENTRIES
        modes = {rt.mode for rt in issuers.values()}
        active = modes - {Mode.off}
        if not active:
            self._filter: TokensFilter | None = None
        else:
            # Tokens from an unknown issuer or malformed ones: deny unless every issuer only detects.
            self._filter = TokensFilter(self, Mode.detect if active == {Mode.detect} else Mode.enforce)

    # -- chain ------------------------------------------------------------------------------
    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        # Every route, public ones too: a presented bearer token is verified (a forged or foreign
        # one gets 401) rather than passed on unchecked; the proxy strips it either way.
        if self._filter is None:
            return []
        return [self._filter]

    def fail(self, ctx: RequestContext, rt: IssuerRuntime | None, internal: str) -> Decision:
        """The one 401 for every token failure (precise reason internal only)."""
        _FAILED.inc()
        if rt is not None:
            ctx.audit["tokens"] = {"issuer": rt.name, "result": internal}
            if rt.mode is Mode.detect and self._filter is not None and self._filter.mode is Mode.enforce:
                # This issuer is in detect mode while the filter enforces for others: record here.
                ctx.detections.append(Detection(TokensFilter.name, internal))
                return SKIP
        return Deny(
            Problem(INVALID_TOKEN, detail=_DETAIL, internal_reason=internal, headers=WWW_AUTHENTICATE)
        )

    def from_cache(self, ctx: RequestContext, digest: bytes) -> bool:
        """Serve a token verified before (by the SHA-256 of the token) while it is unexpired and
        its key is still published. True when ``ctx.token`` was set."""
        hit = self._cache.get(digest)
        if hit is None:
            return False
        if _now() < hit.valid_until and hit.issuer.store.lookup(hit.kid) is not None:
            self._cache.move_to_end(digest)
            _CACHE_HIT.inc()
            ctx.token = hit.identity
            ctx.audit["tokens"] = {**hit.audit, "cached": True}
            return True
        del self._cache[digest]
        return False

    async def verify(self, ctx: RequestContext, token: str, digest: bytes) -> Decision:
        """Verify a strictly parsed compact JWS (``digest`` = SHA-256 of ``token``)."""
        if self.from_cache(ctx, digest):
            return ALLOW
        now = _now()
        head_b64, payload_b64, sig_b64 = token.split(".")
        try:
            header = _json_object(head_b64)
            claims = _json_object(payload_b64)
            signature = _b64(sig_b64)
        except _Malformed:
            return self.fail(ctx, None, TOKEN_MALFORMED)
        iss = claims.get("iss")
        rt = self._by_iss.get(iss) if isinstance(iss, str) else None
        if rt is None:
            return self.fail(ctx, None, TOKEN_UNKNOWN_ISSUER)
        if rt.mode is Mode.off:
            return SKIP

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in rt.algorithms:
            return self.fail(ctx, rt, TOKEN_ALG_NOT_ALLOWED)
        if "crit" in header:  # no JWS extension is understood, so any crit must be refused
            return self.fail(ctx, rt, TOKEN_CRIT_UNSUPPORTED)
        kid = header.get("kid")
        key: VerifyKey | None
        try:
            if kid is None:
                if not rt.store.obtained:
                    await rt.store.refresh()
                    if not rt.store.obtained:
                        raise KeysUnavailable("keys not obtained")
                key = rt.store.only_key()
            elif not isinstance(kid, str):
                return self.fail(ctx, rt, TOKEN_MALFORMED)
            else:
                key = await rt.store.key_for(kid)
        except KeysUnavailable:
            ctx.audit["tokens"] = {"issuer": rt.name, "result": "issuer_keys_unavailable"}
            if rt.mode is Mode.detect and self._filter is not None and self._filter.mode is Mode.enforce:
                ctx.detections.append(Detection(TokensFilter.name, "issuer_keys_unavailable"))
                return SKIP
            return Deny(
                Problem(
                    KEYS_UNAVAILABLE,
                    detail="The token issuer's signing keys could not be obtained. Try again later.",
                    internal_reason="issuer_keys_unavailable",
                    headers={"Retry-After": str(max(1, math.ceil(rt.config.jwks_refetch_min_seconds)))},
                )
            )
        if key is None:
            return self.fail(ctx, rt, TOKEN_UNKNOWN_KID)
        if alg not in key.algorithms:  # e.g. ES256 header against an RSA key: key confusion
            return self.fail(ctx, rt, TOKEN_ALG_NOT_ALLOWED)
        signing_input = token[: len(head_b64) + 1 + len(payload_b64)].encode("ascii")
        if not signature or not VERIFIERS[alg].verify(signing_input, key.key, signature):
            return self.fail(ctx, rt, TOKEN_BAD_SIGNATURE)

        cfg = rt.config
        leeway = cfg.leeway_seconds
        exp: Any = claims.get("exp")  # a number once _is_time says so
        if not _is_time(exp):
            return self.fail(ctx, rt, TOKEN_CLAIMS_INVALID)
        if now >= exp + leeway:
            return self.fail(ctx, rt, TOKEN_EXPIRED)
        for name in ("nbf", "iat"):
            if name in claims:
                v = claims[name]
                if not _is_time(v):
                    return self.fail(ctx, rt, TOKEN_CLAIMS_INVALID)
                if v > now + leeway:
                    return self.fail(ctx, rt, TOKEN_NOT_YET_VALID)
        bound = cfg.max_token_lifetime_seconds
        if bound is not None:
            # A leaked long-lived token keeps its value no longer than an honest one would.
            iat = claims.get("iat")
            if exp - now > bound + leeway or (iat is not None and exp - iat > bound):
                return self.fail(ctx, rt, TOKEN_LIFETIME_TOO_LONG)
        try:
            auds = _str_list(claims.get("aud"))
        except _ClaimsError:
            return self.fail(ctx, rt, TOKEN_CLAIMS_INVALID)
        if auds:
            if rt.audiences.isdisjoint(auds):
                return self.fail(ctx, rt, TOKEN_BAD_AUDIENCE)
        elif "aud" in claims or cfg.tokens_without_audience != "bound_by_scope":
            return self.fail(ctx, rt, TOKEN_BAD_AUDIENCE)
        if not _is_access_token(header, claims, auds, cfg.require_typ_at_jwt):
            return self.fail(ctx, rt, TOKEN_NOT_ACCESS_TOKEN)
        try:
            identity = identity_from_claims(cfg.kind, rt.name, claims)
        except _ClaimsError as e:
            return self.fail(ctx, rt, e.reason)

        audit = {"issuer": rt.name, "kind": cfg.kind, "kid": key.kid}
        if not auds:
            audit["audience"] = "none: bound by scope"
        if identity.consumer_org:
            audit["consumer_org"] = identity.consumer_org
        if len(self._cache) >= self.cache_max:
            self._cache.popitem(last=False)
        valid_until = float(exp) + leeway
        if bound is not None:
            valid_until = min(valid_until, now + bound)
        self._cache[digest] = _Cached(identity, rt, key.kid, valid_until, audit)
        _VERIFIED.inc()
        ctx.token = identity
        ctx.audit["tokens"] = {**audit, "cached": False}
        return ALLOW

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        # A store kept from the previous runtime is running already: its lease starts nothing.
        await asyncio.gather(*(rt.lease.start() for rt in self.issuers.values() if rt.mode is not Mode.off))

    async def close(self) -> None:
        for rt in self.issuers.values():
            await rt.lease.release()  # the last holder of a store closes it

    def readiness(self) -> dict[str, str]:
        return {
            f"jwks.{name}": rt.store.readiness()
            for name, rt in self.issuers.items()
            if rt.mode is not Mode.off
        }

    def adopt(self, previous: Stage) -> None:
        """Keep the verified tokens of issuers whose config is unchanged (their key stores are
        kept through BuildEnv.resources; see build_stage)."""
        if not isinstance(previous, TokensStage):
            return
        kept: dict[int, IssuerRuntime] = {}
        for name, rt in self.issuers.items():
            old = previous.issuers.get(name)
            if old is not None and old.store is rt.store and old.config == rt.config:
                kept[id(old)] = rt
        for digest, entry in previous._cache.items():
            new_rt = kept.get(id(entry.issuer))
            if new_rt is not None:
                self._cache[digest] = _Cached(
                    entry.identity, new_rt, entry.kid, entry.valid_until, entry.audit
                )

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def config_warnings(cfg: Any) -> list[str]:
    """What ``portvakt check-config`` warns about (valid, but weaker than it looks): issuers whose
    tokens without ``aud`` are bound by scope alone, and routes that admit such tokens without
    requiring a scope (any token of that issuer, meant for any API, would pass them)."""
    out: list[str] = []
    scope_bound = [name for name, ic in cfg.issuers.items() if ic.tokens_without_audience == "bound_by_scope"]
    for name in scope_bound:
        out.append(
            f"issuers.{name}.tokens_without_audience: bound_by_scope: a token without `aud` is accepted on its "
            "scopes alone; every route admitting it must require a scope that only this API's clients get"
        )
    if scope_bound:
        for i, route in enumerate(cfg.routes):
            if route.access is None:
                continue
            for j, rule in enumerate(route.access.any_of):
                if (rule.integration or rule.organizations) and not rule.scopes:
                    out.append(
                        f"routes[{i}].access.any_of[{j}] (route {route.name!r}): admits Maskinporten tokens without "
                        f"requiring a scope while {', '.join(scope_bound)} accepts tokens without `aud`"
                    )
    return out


def build_stage(env: BuildEnv) -> TokensStage | None:
    """Build the tokens stage from ``issuers:``. ``jwks_file`` keys are read now; ``jwks_uri``
    keys are fetched by ``start()``. Raises ValueError (config problem) for duplicate ``issuer``
    values or an unusable ``jwks_file``."""
    cfgs: dict[str, IssuerConfig] = env.config.issuers
    if not cfgs:
        return None
    seen: dict[str, str] = {}
    issuers: dict[str, IssuerRuntime] = {}
    for name, cfg in cfgs.items():
        if cfg.issuer in seen:
            raise ValueError(f"issuers.{name}.issuer: same iss as issuers.{seen[cfg.issuer]}")
        seen[cfg.issuer] = name
        issuers[name] = IssuerRuntime(
            name=name,
            config=cfg,
            lease=_key_store(env, name, cfg),
            algorithms=frozenset(cfg.algorithms),
            audiences=cfg.audiences,
        )
    return TokensStage(issuers)


def _key_store(env: BuildEnv, name: str, cfg: IssuerConfig) -> Lease[JwksStore]:
    """The issuer's key store. A ``jwks_uri`` store (keys, refresh schedule, retry task) is kept
    across reloads while everything that decides its keys is the same; a ``jwks_file`` is read
    again on every load (a reload is how a changed file takes effect)."""
    settings: dict[str, Any] = {
        "uri": cfg.jwks_uri,
        "file": env.config.resolve_path(cfg.jwks_file) if cfg.jwks_file else None,
        "algorithms": sorted(cfg.algorithms),
        "cache_seconds": cfg.jwks_cache_seconds,
        "refetch_min_seconds": cfg.jwks_refetch_min_seconds,
        "timeout_seconds": cfg.jwks_timeout_seconds,
        "retry_max_seconds": cfg.jwks_retry_max_seconds,
    }

    def make() -> JwksStore:
        store = JwksStore(name, **settings)
        if store.file is not None and cfg.mode is not Mode.off:
            try:
                store.load_sync()
            except Exception as e:
                raise ValueError(f"issuers.{name}.jwks_file: {e}") from None
        return store

    return env.resources.acquire(("issuers.jwks", name, settings) if cfg.jwks_uri else None, make)
