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

The rooms: ``config`` (the ``issuers:`` model, check-config warnings), ``levels`` (ID-porten
``acr`` order), ``reasons`` (problems, internal reason ids, counters), ``claims`` (strict parsing
of the header, the JWS and its claims), ``cache`` (verified tokens), ``filter`` (the per-request
filter and token binding), ``stage`` (key stores, verification, lifecycle, ``build_stage``).
"""

from __future__ import annotations

from filters.issuers.cache import CACHE_MAX_ENTRIES, VerifiedToken, VerifiedTokens
from filters.issuers.claims import MAX_TOKEN_CHARS, identity_from_claims
from filters.issuers.config import IssuerConfig, config_warnings
from filters.issuers.filter import TokensFilter, binding_problem
from filters.issuers.levels import ACR_RANKS, acr_rank
from filters.issuers.reasons import (
    INTERNAL_REASONS,
    INVALID_TOKEN,
    KEYS_UNAVAILABLE,
    TOKEN_ALG_NOT_ALLOWED,
    TOKEN_BAD_AUDIENCE,
    TOKEN_BAD_SIGNATURE,
    TOKEN_CERTIFICATE_ORG_MISMATCH,
    TOKEN_CLAIMS_INVALID,
    TOKEN_CNF_MISMATCH,
    TOKEN_CRIT_UNSUPPORTED,
    TOKEN_EXPIRED,
    TOKEN_KIND_MISMATCH,
    TOKEN_LIFETIME_TOO_LONG,
    TOKEN_MALFORMED,
    TOKEN_NOT_ACCESS_TOKEN,
    TOKEN_NOT_YET_VALID,
    TOKEN_UNKNOWN_ISSUER,
    TOKEN_UNKNOWN_KID,
    VERIFICATIONS,
    WWW_AUTHENTICATE,
)
from filters.issuers.stage import IssuerRuntime, TokensStage, build_stage

__all__ = [
    "ACR_RANKS",
    "CACHE_MAX_ENTRIES",
    "INTERNAL_REASONS",
    "INVALID_TOKEN",
    "KEYS_UNAVAILABLE",
    "MAX_TOKEN_CHARS",
    "TOKEN_ALG_NOT_ALLOWED",
    "TOKEN_BAD_AUDIENCE",
    "TOKEN_BAD_SIGNATURE",
    "TOKEN_CERTIFICATE_ORG_MISMATCH",
    "TOKEN_CLAIMS_INVALID",
    "TOKEN_CNF_MISMATCH",
    "TOKEN_CRIT_UNSUPPORTED",
    "TOKEN_EXPIRED",
    "TOKEN_KIND_MISMATCH",
    "TOKEN_LIFETIME_TOO_LONG",
    "TOKEN_MALFORMED",
    "TOKEN_NOT_ACCESS_TOKEN",
    "TOKEN_NOT_YET_VALID",
    "TOKEN_UNKNOWN_ISSUER",
    "TOKEN_UNKNOWN_KID",
    "VERIFICATIONS",
    "WWW_AUTHENTICATE",
    "IssuerConfig",
    "IssuerRuntime",
    "TokensFilter",
    "TokensStage",
    "VerifiedToken",
    "VerifiedTokens",
    "acr_rank",
    "binding_problem",
    "build_stage",
    "config_warnings",
    "identity_from_claims",
]
