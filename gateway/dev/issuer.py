"""Development token issuer: mints tokens shaped like real Maskinporten and ID-porten tokens.

``mint_token(key, kid, kind, ...)`` is the one minting function: the ``portvakt dev-token``
command, the test fixtures and the bench all call it. The key is the dev issuer's RSA private key
(``issuer-key.pem`` from ``portvakt dev-certs``); its public half is ``issuer-jwks.json`` beside it,
which a config trusts with ``jwks_file``. For development and tests only: the default ``iss``
values are under the reserved ``.invalid`` domain so they can never be mistaken for the real
issuers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

DEV_MASKINPORTEN_ISS = "https://maskinporten.dev.portvakt.invalid/"
DEV_IDPORTEN_ISS = "https://idporten.dev.portvakt.invalid"
DEV_ISS = {"maskinporten": DEV_MASKINPORTEN_ISS, "idporten": DEV_IDPORTEN_ISS}
# The audience the demo config's issuers require: what `portvakt dev-token` puts in `aud` by default.
DEV_AUDIENCE = "https://api.dev.portvakt.invalid/"
DEFAULT_KEY = "certs/dev/issuer-key.pem"
DEFAULT_ORG = "991825827"
DEFAULT_CLIENT_ID = "3f6c0a55-5d2e-4c1e-9a43-0c7f2b9d8e11"
_UNSET: Any = object()


def load_private_key(key: Any) -> Any:
    """A private key object from PEM bytes/str, a path, or a key object (returned as-is)."""
    if not isinstance(key, (str, bytes, Path)):
        return key
    if isinstance(key, Path) or (isinstance(key, str) and "-----BEGIN" not in key):
        key = Path(key).read_bytes()
    if isinstance(key, str):
        key = key.encode()
    return serialization.load_pem_private_key(key, password=None)


def key_id(key: Any) -> str:
    """The RFC 7638 thumbprint of an RSA key (the ``kid`` that ``gateway.dev.ca`` publishes)."""
    from gateway.dev.ca import rsa_public_jwk

    k = load_private_key(key)
    return rsa_public_jwk(k.public_key())["kid"]


def mint_token(
    key_pem: Any,
    kid: str | None,
    kind: str = "maskinporten",
    *,
    iss: str | None = None,
    org: str | None = DEFAULT_ORG,
    scope: str | None = _UNSET,
    pid: str | None = None,
    acr: str | None = "idporten-loa-high",
    ttl: int = 600,
    alg: str = "RS256",
    client_id: str = DEFAULT_CLIENT_ID,
    audience: str | list[str] | None = None,
    headers: dict[str, Any] | None = None,
    now: float | None = None,
    override: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """Mint a signed JWT shaped like a ``kind`` token.

    ``key_pem``: the private key (PEM bytes/str, a path, or a key object). ``kid``: the header
    ``kid`` (None: the key's RFC 7638 thumbprint). ``ttl`` seconds from ``now`` (negative gives an
    expired token). ``headers`` are added to the JOSE header. Extra keyword ``claims`` are added
    or override the shaped ones (``override`` does the same for names that clash with parameters,
    e.g. ``override={"iss": None}``); a claim given as None is removed.

    Maskinporten: ``iss``, ``consumer`` {authority iso6523-actorid-upis, ID "0192:<org>"},
    ``scope`` (default "ks:fiks"), ``client_amr``, ``client_id``, ``token_type``, ``iat``, ``exp``, ``jti``.
    ID-porten: ``iss``, ``pid``, ``sub``, ``acr``, ``amr``, ``client_id``, ``scope`` (default "openid"), ``iat``,
    ``exp``, ``jti``. Raises ValueError for an unknown kind or an ID-porten token without pid.
    """
    key = load_private_key(key_pem)
    if kind not in DEV_ISS:
        raise ValueError(f"kind must be maskinporten or idporten, not {kind!r}")
    t = int(now if now is not None else time.time())
    payload: dict[str, Any] = {"iss": iss or DEV_ISS[kind]}
    if kind == "maskinporten":
        if org is not None:
            payload["consumer"] = {"authority": "iso6523-actorid-upis", "ID": f"0192:{org}"}
        scope = "ks:fiks" if scope is _UNSET else scope
        if scope is not None:
            payload["scope"] = scope
        payload.update(client_amr="virksomhetssertifikat", token_type="Bearer", client_id=client_id)
    else:
        if pid is None and "pid" not in claims:
            raise ValueError("an ID-porten token needs a pid")
        if pid is not None:
            payload["pid"] = pid
            payload["sub"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"portvakt-dev-sub:{pid}"))
        if acr is not None:
            payload["acr"] = acr
        scope = "openid" if scope is _UNSET else scope
        if scope is not None:
            payload["scope"] = scope
        payload.update(amr=["TestID"], client_id=client_id, token_type="Bearer")
    if audience is not None:
        payload["aud"] = audience
    payload.update(iat=t, exp=t + int(ttl), jti=str(uuid.uuid4()))
    for name, value in {**claims, **(override or {})}.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    head: dict[str, Any] = {"typ": "JWT", "kid": kid if kid is not None else key_id(key)}
    if headers:
        head.update(headers)
    head = {k: v for k, v in head.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers=head)


# -- CLI -------------------------------------------------------------------------------------


def _kid_for(key_path: Path, key: Any) -> str:
    """The kid published for this key in ``issuer-jwks.json`` beside it, else its thumbprint."""
    kid = key_id(key)
    jwks_path = key_path.with_name("issuer-jwks.json")
    try:
        keys = json.loads(jwks_path.read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        return kid
    pub_n = key.public_key().public_numbers().n
    for jwk in keys:
        try:
            n = int.from_bytes(jwt.utils.base64url_decode(jwk["n"]), "big")
        except (KeyError, TypeError, ValueError):
            continue
        if n == pub_n and isinstance(jwk.get("kid"), str):
            return jwk["kid"]
    return kid


def _cmd_dev_token(args: argparse.Namespace) -> int:
    key_path = Path(args.key)
    try:
        key = load_private_key(key_path)
    except (OSError, ValueError) as e:
        print(
            f"dev-token: cannot read the issuer key {key_path}: {e} (run `portvakt dev-certs certs/dev`)",
            file=sys.stderr,
        )
        return 2
    if args.aud is None:
        args.aud = [DEV_AUDIENCE]
    if args.kind == "idporten" and not args.pid:
        print("dev-token: --pid is required for --kind idporten", file=sys.stderr)
        return 2
    token = mint_token(
        key,
        args.kid or _kid_for(key_path, key),
        args.kind,
        iss=args.iss,
        org=args.org,
        scope=args.scope if args.scope is not None else _UNSET,
        pid=args.pid,
        acr=args.acr,
        ttl=args.ttl,
        audience=(args.aud or None) if len(args.aud) != 1 else (args.aud[0] or None),
    )
    print(token)
    return 0


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dev-token`` to the ``portvakt`` CLI. The handler is ``args.func(args) -> exit code``."""
    p = subparsers.add_parser(
        "dev-token",
        help="mint a Maskinporten- or ID-porten-shaped token signed by the dev issuer key",
        description=(
            "Print a signed JWT shaped like a Maskinporten (consumer 0192:<org>, scope) or ID-porten "
            "(pid, acr) access token, signed with the dev issuer key from `portvakt dev-certs`. "
            "A config trusts it through issuers.<name>.jwks_file: certs/dev/issuer-jwks.json with "
            f"issuer {DEV_MASKINPORTEN_ISS!r} or {DEV_IDPORTEN_ISS!r}. For development only."
        ),
    )
    p.add_argument("--kind", choices=("maskinporten", "idporten"), default="maskinporten")
    p.add_argument(
        "--org", default=DEFAULT_ORG, help=f"consumer org number (maskinporten; default {DEFAULT_ORG})"
    )
    p.add_argument(
        "--scope", default=None, help='space-separated scopes (default "ks:fiks"; idporten "openid")'
    )
    p.add_argument(
        "--pid", help="the person's national identity number (idporten; use a synthetic test number)"
    )
    p.add_argument("--acr", default="idporten-loa-high", help="idporten level (default idporten-loa-high)")
    p.add_argument("--ttl", type=int, default=600, help="seconds until exp; negative gives an expired token")
    p.add_argument("--key", default=DEFAULT_KEY, help=f"issuer private key PEM (default {DEFAULT_KEY})")
    p.add_argument("--kid", help="key id (default: the kid of this key in issuer-jwks.json beside it)")
    p.add_argument("--iss", help="issuer (default the dev iss of the kind)")
    p.add_argument(
        "--aud",
        action="append",
        default=None,
        help=f"audience claim; repeat for several; --aud '' for a token without aud (default {DEV_AUDIENCE})",
    )
    p.set_defaults(func=_cmd_dev_token)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m gateway.dev.issuer ...``)."""
    parser = argparse.ArgumentParser(prog="portvakt")
    sub = parser.add_subparsers(dest="command", required=True)
    register_commands(sub)
    args = parser.parse_args(["dev-token", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
