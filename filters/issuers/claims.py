"""Reading a bearer token: the strict ``Authorization`` parse, the compact JWS segments (base64url,
JSON objects without duplicate members), access token versus id_token, and the claims of a
verified token as a ``TokenIdentity`` (Maskinporten or ID-porten shape). No I/O, no keys."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from typing import Any, TypeGuard

from filters.issuers.reasons import (
    TOKEN_CLAIMS_INVALID,
    TOKEN_CNF_MISMATCH,
    TOKEN_KIND_MISMATCH,
)
from gateway.context import TokenIdentity

MAX_TOKEN_CHARS = 16384
BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)", re.ASCII)
_ORG = re.compile(r"[0-9]{9}", re.ASCII)
_PID = re.compile(r"[0-9]{11}", re.ASCII)


def wall_clock() -> float:
    """Wall-clock seconds. Callers look it up on this module at call time (a seam for tests)."""
    return time.time()


class Malformed(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate member names make a JSON object mean different things to different parsers.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise Malformed(f"duplicate member {k!r}")
        out[k] = v
    return out


def b64decode(seg: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        raise Malformed("bad base64url") from None


def json_object(seg: str) -> dict[str, Any]:
    try:
        obj = json.loads(b64decode(seg), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("bad JSON") from None
    if not isinstance(obj, dict):
        raise Malformed("not a JSON object")
    return obj


def is_numeric_date(v: object) -> TypeGuard[float]:
    """A JSON number that is a finite NumericDate (bool is not one)."""
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]  # type() checked it


class ClaimsError(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _org_of(party: Any, what: str) -> tuple[str, str | None]:
    """(raw ID, org number or None) of a Maskinporten ``consumer``/``supplier`` object."""
    if not isinstance(party, dict) or not isinstance(party.get("ID"), str):
        raise ClaimsError(TOKEN_CLAIMS_INVALID)
    ident = party["ID"]
    if ident.startswith("0192:"):
        org = ident[5:]
        if not _ORG.fullmatch(org):
            raise ClaimsError(TOKEN_CLAIMS_INVALID)
        return ident, org
    return ident, None  # another ISO 6523 authority: kept as-is, no Norwegian org number


def _str_or_none(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise ClaimsError(TOKEN_CLAIMS_INVALID)


def _scopes(v: Any) -> frozenset[str]:
    if v is None:
        return frozenset()
    if not isinstance(v, str):
        raise ClaimsError(TOKEN_CLAIMS_INVALID)
    return frozenset(s for s in v.split(" ") if s)


def str_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ClaimsError(TOKEN_CLAIMS_INVALID)


_ACCESS_TYPS = frozenset({"jwt", "at+jwt", "application/at+jwt"})
_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
# Claims only an OpenID Connect id_token carries (OIDC Core 2, 3.1.3.6, 3.3.2.11): never an access token's.
ID_TOKEN_MARKERS = ("nonce", "at_hash", "c_hash", "s_hash")


def is_access_token(
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
    Raises ClaimsError for a ``cnf`` that is present but not shaped as RFC 7800 says."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise ClaimsError(TOKEN_CLAIMS_INVALID)
    x5t = cnf.get("x5t#S256")
    if x5t is None:
        if cnf:  # a confirmation method we cannot check (jkt: DPoP, jwk...): fail closed
            raise ClaimsError(TOKEN_CNF_MISMATCH)
        return None
    if not isinstance(x5t, str) or not x5t:
        raise ClaimsError(TOKEN_CLAIMS_INVALID)
    return x5t


def identity_from_claims(kind: str, issuer_name: str, claims: dict[str, Any]) -> TokenIdentity:
    """Verified claims -> TokenIdentity. Raises ClaimsError when the token is not shaped like a
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
            raise ClaimsError(TOKEN_KIND_MISMATCH)
        consumer, consumer_org = _org_of(claims["consumer"], "consumer")
        supplier_org = None
        if claims.get("supplier") is not None:
            _, supplier_org = _org_of(claims["supplier"], "supplier")
        client_amr = claims.get("client_amr")
        if isinstance(client_amr, list):
            client_amr = " ".join(str_list(client_amr)) or None
        return TokenIdentity(
            consumer=consumer,
            consumer_org=consumer_org,
            supplier_org=supplier_org,
            client_amr=_str_or_none(client_amr),
            **common,
        )
    pid = claims.get("pid")
    if pid is None:
        raise ClaimsError(TOKEN_KIND_MISMATCH)
    if not isinstance(pid, str) or not _PID.fullmatch(pid):
        raise ClaimsError(TOKEN_CLAIMS_INVALID)
    return TokenIdentity(
        pid=pid, acr=_str_or_none(claims.get("acr")), amr=str_list(claims.get("amr")), **common
    )
