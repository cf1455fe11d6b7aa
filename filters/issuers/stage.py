"""The tokens stage: the issuers' key stores and verified tokens, built once per runtime; verifies
a token (header, signature, time claims, audience, access-token shape) and answers every failure
with the one 401."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from filters.issuers import claims as token_claims
from filters.issuers.cache import VerifiedToken, VerifiedTokens
from filters.issuers.claims import (
    ClaimsError,
    Malformed,
    b64decode,
    identity_from_claims,
    is_access_token,
    is_numeric_date,
    json_object,
    str_list,
)
from filters.issuers.config import IssuerConfig
from filters.issuers.filter import TokensFilter
from filters.issuers.reasons import (
    DETAIL,
    FAILED,
    INVALID_TOKEN,
    KEYS_UNAVAILABLE,
    TOKEN_ALG_NOT_ALLOWED,
    TOKEN_BAD_AUDIENCE,
    TOKEN_BAD_SIGNATURE,
    TOKEN_CLAIMS_INVALID,
    TOKEN_CRIT_UNSUPPORTED,
    TOKEN_EXPIRED,
    TOKEN_LIFETIME_TOO_LONG,
    TOKEN_MALFORMED,
    TOKEN_NOT_ACCESS_TOKEN,
    TOKEN_NOT_YET_VALID,
    TOKEN_UNKNOWN_ISSUER,
    TOKEN_UNKNOWN_KID,
    VERIFIED,
    WWW_AUTHENTICATE,
)
from filters.jwks import VERIFIERS, JwksStore, KeysUnavailable, VerifyKey
from gateway.chain import ALLOW, SKIP, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.context import Detection, RequestContext
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig


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


class TokensStage(Stage):
    name = "tokens"

    def __init__(self, issuers: dict[str, IssuerRuntime]) -> None:
        self.issuers = issuers
        self._by_iss = {rt.config.issuer: rt for rt in issuers.values()}
        self.verified = VerifiedTokens()
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
        FAILED.inc()
        if rt is not None:
            ctx.audit["tokens"] = {"issuer": rt.name, "result": internal}
            if rt.mode is Mode.detect and self._filter is not None and self._filter.mode is Mode.enforce:
                # This issuer is in detect mode while the filter enforces for others: record here.
                ctx.detections.append(Detection(TokensFilter.name, internal))
                return SKIP
        return Deny(Problem(INVALID_TOKEN, detail=DETAIL, internal_reason=internal, headers=WWW_AUTHENTICATE))

    async def verify(self, ctx: RequestContext, token: str, digest: bytes) -> Decision:
        """Verify a strictly parsed compact JWS (``digest`` = SHA-256 of ``token``)."""
        if self.verified.serve(ctx, digest):
            return ALLOW
        now = token_claims.wall_clock()
        head_b64, payload_b64, sig_b64 = token.split(".")
        try:
            header = json_object(head_b64)
            claims = json_object(payload_b64)
            signature = b64decode(sig_b64)
        except Malformed:
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
        if not is_numeric_date(exp):
            return self.fail(ctx, rt, TOKEN_CLAIMS_INVALID)
        if now >= exp + leeway:
            return self.fail(ctx, rt, TOKEN_EXPIRED)
        for name in ("nbf", "iat"):
            if name in claims:
                v = claims[name]
                if not is_numeric_date(v):
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
            auds = str_list(claims.get("aud"))
        except ClaimsError:
            return self.fail(ctx, rt, TOKEN_CLAIMS_INVALID)
        if auds:
            if rt.audiences.isdisjoint(auds):
                return self.fail(ctx, rt, TOKEN_BAD_AUDIENCE)
        elif "aud" in claims or cfg.tokens_without_audience != "bound_by_scope":
            return self.fail(ctx, rt, TOKEN_BAD_AUDIENCE)
        if not is_access_token(header, claims, auds, cfg.require_typ_at_jwt):
            return self.fail(ctx, rt, TOKEN_NOT_ACCESS_TOKEN)
        try:
            identity = identity_from_claims(cfg.kind, rt.name, claims)
        except ClaimsError as e:
            return self.fail(ctx, rt, e.reason)

        audit = {"issuer": rt.name, "kind": cfg.kind, "kid": key.kid}
        if not auds:
            audit["audience"] = "none: bound by scope"
        if identity.consumer_org:
            audit["consumer_org"] = identity.consumer_org
        valid_until = float(exp) + leeway
        if bound is not None:
            valid_until = min(valid_until, now + bound)
        self.verified.put(digest, VerifiedToken(identity, rt, key.kid, valid_until, audit))
        VERIFIED.inc()
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
        self.verified.carry_over(previous.verified, kept)


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
