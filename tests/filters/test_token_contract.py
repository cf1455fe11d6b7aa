"""Whose token it is (audience, access token vs id_token) and what it is bound to (client
certificate org, RFC 8705 ``cnf``): filters/issuers/ against a real local issuer."""

from __future__ import annotations

import base64
import hashlib
import types
from typing import Any

import pytest

from filters.issuers import IssuerConfig
from gateway.chain import ALLOW, SKIP
from gateway.context import CertificateIdentity
from tests.filters.helpers_issuers import config, denied, make_ctx, make_stage, run, stage_route
from tests.fixtures.issuer import AUDIENCE

OTHER_ORG = "958935420"
SUPPLIER_ORG = "914994780"


@pytest.fixture
async def stage(issuer):
    s = await make_stage(issuer.issuers_config())
    yield s
    await s.close()


# -- audience --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["maskinporten", "idporten"])
@pytest.mark.parametrize(
    "aud, ok",
    [
        (AUDIENCE, True),
        (["https://other.example/", AUDIENCE], True),
        ("https://other.example/", False),  # an access token issued for another API
        (["https://other.example/"], False),
        (None, False),  # no aud where the issuer states one and did not opt in to scope binding
        ([], False),
        (AUDIENCE.upper(), False),  # exact match only
    ],
)
async def test_audience_required_by_default(stage, issuer, kind, aud, ok):
    src = issuer if kind == "maskinporten" else issuer.idporten
    d, ctx = await run(stage, src.mint(audience=aud))
    if ok:
        assert d is ALLOW and ctx.token is not None and ctx.token.kind == kind
    else:
        denied(d, ctx, "token_bad_audience")


async def test_several_audiences(issuer):
    s = await make_stage({"m": issuer.config(audience=["https://a.example/", "https://b.example/"])})
    try:
        for aud, ok in [("https://a.example/", True), ("https://b.example/", True), (AUDIENCE, False)]:
            d, ctx = await run(s, issuer.mint(audience=aud))
            assert (d is ALLOW) is ok, aud
    finally:
        await s.close()


async def test_audience_claim_of_wrong_type_is_refused(stage, issuer):
    d, ctx = await run(stage, issuer.mint(claims={"aud": 7}))
    denied(d, ctx, "token_claims_invalid")
    d, ctx = await run(stage, issuer.mint(claims={"aud": [AUDIENCE, 7]}))
    denied(d, ctx, "token_claims_invalid")


async def test_maskinporten_scope_bound_accepts_only_tokens_without_aud(issuer):
    s = await make_stage({"m": issuer.config(audience=None, tokens_without_audience="bound_by_scope")})
    try:
        d, ctx = await run(s, issuer.mint(audience=None))
        assert d is ALLOW
        assert ctx.audit["tokens"]["audience"] == "none: bound by scope"
        # A token that names an audience names someone: it must be us, and here nobody is.
        d, ctx = await run(s, issuer.mint(audience="https://other.example/"))
        denied(d, ctx, "token_bad_audience")
        d, ctx = await run(s, issuer.mint(audience=[]))
        denied(d, ctx, "token_bad_audience")
    finally:
        await s.close()
    s = await make_stage({"m": issuer.config(tokens_without_audience="bound_by_scope")})
    try:
        assert (await run(s, issuer.mint(audience=None)))[0] is ALLOW
        assert (await run(s, issuer.mint()))[0] is ALLOW
        denied(*await run(s, issuer.mint(audience="https://other.example/")), "token_bad_audience")
    finally:
        await s.close()


def test_config_contract():
    base = {"issuer": "https://x/", "jwks_uri": "https://x/jwk"}
    with pytest.raises(ValueError, match="audience is required for an idporten issuer"):
        IssuerConfig.model_validate({**base, "kind": "idporten"})
    with pytest.raises(ValueError, match="bound_by_scope"):
        IssuerConfig.model_validate({**base, "kind": "maskinporten"})
    c = IssuerConfig.model_validate(
        {**base, "kind": "maskinporten", "tokens_without_audience": "bound_by_scope"}
    )
    assert c.audiences == frozenset()
    c = IssuerConfig.model_validate({**base, "kind": "idporten", "audience": ["a", "b"]})
    assert c.audiences == {"a", "b"}


# -- access token, not id_token --------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, claims, ok",
    [
        ({}, {}, True),  # typ JWT (the dev issuer's default)
        ({"typ": "at+jwt"}, {}, True),
        ({"typ": "application/at+jwt"}, {}, True),
        ({"typ": None}, {}, True),  # no typ at all
        ({"typ": "id_token"}, {}, False),
        ({"typ": "logout+jwt"}, {}, False),
        ({"typ": "secevent+jwt"}, {}, False),
        ({"typ": "dpop+jwt"}, {}, False),
        ({"typ": 1}, {}, False),
        ({}, {"nonce": "n-0S6_WzA2Mj"}, False),  # id_token markers (OIDC Core)
        ({}, {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"}, False),
        ({}, {"c_hash": "LDktKdoQak3Pk0cnXxCltA"}, False),
        ({}, {"s_hash": "x"}, False),
        ({"typ": "at+jwt"}, {"nonce": "n"}, False),  # a typ does not excuse an id_token claim
        # An id_token is addressed to its own client: aud == client_id / azp.
        ({}, {"client_id": "my-client", "aud": ["my-client", AUDIENCE]}, False),
        ({}, {"azp": "my-client", "client_id": None, "aud": [AUDIENCE, "my-client"]}, False),
        ({}, {"azp": "my-client", "client_id": None}, True),  # azp alone, aud = the API: fine
    ],
)
@pytest.mark.parametrize("kind", ["maskinporten", "idporten"])
async def test_id_tokens_are_not_access_tokens(stage, issuer, kind, headers, claims, ok):
    src = issuer if kind == "maskinporten" else issuer.idporten
    d, ctx = await run(stage, src.mint(headers=headers, claims=claims))
    if ok:
        assert d is ALLOW
    else:
        denied(d, ctx, "token_not_access_token")


async def test_real_shaped_idporten_id_token_with_our_audience_refused(stage, issuer):
    """An ID-porten id_token whose client happens to be configured as our audience (a common
    misconfiguration: the operator puts its own client_id in audience) is still refused."""
    tok = issuer.idporten.mint(
        audience=AUDIENCE,
        claims={
            "nonce": "abc",
            "azp": AUDIENCE,
            "client_id": None,
            "sid": "s",
            "auth_time": 1,
            "at_hash": "h",
        },
    )
    denied(*await run(stage, tok), "token_not_access_token")


async def test_require_typ_at_jwt(issuer):
    s = await make_stage({"i": issuer.idporten.config(require_typ_at_jwt=True)})
    try:
        assert (await run(s, issuer.idporten.mint(headers={"typ": "at+jwt"})))[0] is ALLOW
        denied(*await run(s, issuer.idporten.mint()), "token_not_access_token")
        denied(*await run(s, issuer.idporten.mint(headers={"typ": None})), "token_not_access_token")
    finally:
        await s.close()


# -- binding ---------------------------------------------------------------------------------


def cert(org: str | None, der: bytes = b"\x30\x03\x02\x01\x01") -> CertificateIdentity:
    return CertificateIdentity(
        org_number=org, subject="CN=x", serial_number=1, fingerprint_sha256="00", source="tls", der=der
    )


def routed(ctx, relaxed: bool = False):
    rc = config({}).routes[0]
    if relaxed:
        rc = rc.model_copy(
            update={"access": rc.access.model_copy(update={"allow_certificate_org_mismatch": True})}
        )
    ctx.route = types.SimpleNamespace(config=rc, name=rc.name)
    return ctx


async def check(stage, token: str, certificate=None, relaxed: bool = False) -> tuple[Any, Any]:
    ctx = routed(make_ctx(f"Bearer {token}"), relaxed)
    ctx.certificate = certificate
    f = stage.filters_for_route(stage_route())[0]
    return await f.check(ctx), ctx


def x5t(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


async def test_certificate_org_must_match_token_org(stage, issuer):
    tok = issuer.mint()  # consumer 991825827
    assert (await check(stage, tok, cert("991825827")))[0] is ALLOW
    assert (await check(stage, tok, None))[0] is ALLOW  # no certificate: nothing to compare
    assert (await check(stage, tok, cert(None)))[0] is ALLOW  # a certificate without an org number
    d, ctx = await check(stage, tok, cert(OTHER_ORG))
    denied(d, ctx, "token_certificate_org_mismatch")
    # Twice: the second time the token comes from the cache, the binding is checked again.
    d, ctx = await check(stage, tok, cert(OTHER_ORG))
    denied(d, ctx, "token_certificate_org_mismatch")
    # The route may relax it explicitly.
    d, ctx = await check(stage, tok, cert(OTHER_ORG), relaxed=True)
    assert d is ALLOW and ctx.token is not None


async def test_supplier_certificate_agrees_with_delegated_token(stage, issuer):
    tok = issuer.mint(
        claims={"supplier": {"authority": "iso6523-actorid-upis", "ID": f"0192:{SUPPLIER_ORG}"}}
    )
    assert (await check(stage, tok, cert(SUPPLIER_ORG)))[0] is ALLOW
    denied(*await check(stage, tok, cert(OTHER_ORG)), "token_certificate_org_mismatch")


async def test_person_token_has_no_org_to_compare(stage, issuer):
    assert (await check(stage, issuer.idporten.mint(), cert(OTHER_ORG)))[0] is ALLOW


async def test_cnf_x5t_must_name_the_client_certificate(stage, issuer):
    der = b"\x30\x03\x02\x01\x07"
    tok = issuer.mint(claims={"cnf": {"x5t#S256": x5t(der)}})
    d, ctx = await check(stage, tok, cert("991825827", der))
    assert d is ALLOW and ctx.token.cnf_x5t_s256 == x5t(der)
    denied(*await check(stage, tok, cert("991825827", der + b"\x00")), "token_cnf_mismatch")
    denied(*await check(stage, tok, None), "token_cnf_mismatch")  # bound token without any certificate
    denied(*await check(stage, tok, cert("991825827", b"")), "token_cnf_mismatch")


@pytest.mark.parametrize(
    "cnf, reason",
    [
        ({"jkt": "abc"}, "token_cnf_mismatch"),  # DPoP binding: we cannot check it, so refuse
        ({"x5t#S256": ""}, "token_claims_invalid"),
        ({"x5t#S256": 5}, "token_claims_invalid"),
        ("x5t", "token_claims_invalid"),
    ],
)
async def test_unusable_cnf_fails_closed(stage, issuer, cnf, reason):
    denied(*await check(stage, issuer.mint(claims={"cnf": cnf}), cert("991825827")), reason)


async def test_empty_cnf_is_no_binding(stage, issuer):
    assert (await check(stage, issuer.mint(claims={"cnf": {}}), None))[0] is ALLOW


async def test_detect_issuer_records_binding_failure(issuer):
    s = await make_stage({"m": issuer.config(mode="detect"), "i": issuer.idporten.config()})
    try:
        d, ctx = await check(s, issuer.mint(), cert(OTHER_ORG))
        assert d is SKIP and ctx.token is not None
        assert [x.reason for x in ctx.detections] == ["token_certificate_org_mismatch"]
    finally:
        await s.close()


# -- dev-token CLI: mints for the demo audience ------------------------------------------------


@pytest.mark.parametrize(
    "args, aud",
    [
        ([], "https://api.dev.portvakt.invalid/"),
        (["--aud", "https://x.example/"], "https://x.example/"),
        (["--aud", "a", "--aud", "b"], ["a", "b"]),
        (["--aud", ""], None),
    ],
)
def test_dev_token_audience(tmp_path, capsys, args, aud):
    import json as _json

    from cryptography.hazmat.primitives import serialization

    from gateway.dev.issuer import DEV_AUDIENCE, main
    from tests.fixtures.issuer import new_rsa_key

    key = tmp_path / "issuer-key.pem"
    key.write_bytes(
        new_rsa_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert main(["--key", str(key), *args]) == 0
    token = capsys.readouterr().out.strip()
    seg = token.split(".")[1]
    claims = _json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    assert claims.get("aud") == aud
    assert DEV_AUDIENCE == "https://api.dev.portvakt.invalid/"
