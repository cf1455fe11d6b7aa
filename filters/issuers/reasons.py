"""What a token check ends in: the problems a client sees (one 401 for every failure, 503 while
an issuer's keys are unavailable), the precise internal reasons (audit, log and metrics only), and
the verification counters."""

from __future__ import annotations

from prometheus_client import Counter

from gateway import problems
from gateway.metrics import REGISTRY

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
VERIFIED = VERIFICATIONS.labels("verified")
CACHE_HIT = VERIFICATIONS.labels("cache_hit")
FAILED = VERIFICATIONS.labels("failed")

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
DETAIL = "The bearer token is not valid."
