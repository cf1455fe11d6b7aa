"""filters/issuers: valid tokens, what is not a bearer token or is malformed, and the attack
table (forged, foreign, confused tokens) with the precise internal reason of each 401.

Unit tests on hand-built contexts, against a real local JWKS issuer (tests/fixtures/issuer.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from gateway.chain import ALLOW, SKIP, Deny
from tests.filters.helpers_issuers import (
    b64,
    config,
    denied,
    forge,
    make_ctx,
    make_stage,
    payload_of,
    run,
    stage_route,
)
from tests.fixtures.issuer import TEST_PID, new_rsa_key


@pytest.fixture
async def stage(issuer):
    s = await make_stage(issuer.issuers_config())
    yield s
    await s.close()


# -- valid tokens ----------------------------------------------------------------------------


async def test_maskinporten_token_lands_on_context(stage, issuer):
    token = issuer.mint(
        org="958935420",
        scope="ks:fiks ks:fiks/innsyn",
        claims={"supplier": {"authority": "iso6523-actorid-upis", "ID": "0192:974760673"}},
    )
    d, ctx = await run(stage, token)
    assert d is ALLOW
    t = ctx.token
    assert (t.kind, t.issuer, t.iss) == ("maskinporten", "maskinporten", issuer.iss)
    assert (t.consumer, t.consumer_org, t.supplier_org) == ("0192:958935420", "958935420", "974760673")
    assert t.scopes == frozenset({"ks:fiks", "ks:fiks/innsyn"})
    assert t.client_amr == "virksomhetssertifikat" and t.client_id and t.jti
    assert t.pid is None and t.exp == payload_of(token)["exp"]
    assert ctx.organization == "958935420"
    assert ctx.audit["tokens"] == {
        "issuer": "maskinporten",
        "kind": "maskinporten",
        "kid": issuer.kid,
        "consumer_org": "958935420",
        "cached": False,
    }


async def test_idporten_token_lands_on_context(stage, idporten_issuer):
    token = idporten_issuer.mint(acr="idporten-loa-substantial")
    d, ctx = await run(stage, token)
    assert d is ALLOW
    t = ctx.token
    assert (t.kind, t.issuer, t.pid, t.acr, t.amr) == (
        "idporten",
        "idporten",
        TEST_PID,
        "idporten-loa-substantial",
        ("TestID",),
    )
    assert t.consumer is None and t.consumer_org is None and t.scopes == frozenset({"openid"})
    assert "pid" not in json.dumps(ctx.audit)


async def test_other_consumer_authority_is_kept_without_org(stage, issuer):
    token = issuer.mint(
        claims={"consumer": {"authority": "iso6523-actorid-upis", "ID": "0088:7080000000000"}}
    )
    d, ctx = await run(stage, token)
    assert d is ALLOW and ctx.token.consumer == "0088:7080000000000" and ctx.token.consumer_org is None


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_scheme_is_case_insensitive(stage, issuer, scheme):
    d, ctx = await run(stage, None, raw=f"{scheme} {issuer.mint()}")
    assert d is ALLOW


@pytest.mark.parametrize("alg", ["RS384", "RS512"])
async def test_configured_rsa_algorithms(issuer, alg):
    s = await make_stage({"m": issuer.config()})
    try:  # the JWK says alg RS256: other algorithms are refused for that key
        d, ctx = await run(s, issuer.mint(alg=alg))
        denied(d, ctx, "token_alg_not_allowed")
    finally:
        await s.close()
    issuer.publish_alg = False
    s = await make_stage({"m": issuer.config()})
    try:
        d, _ = await run(s, issuer.mint(alg=alg))
        assert d is ALLOW
    finally:
        await s.close()


async def test_leeway_is_honoured(stage, issuer):
    d, _ = await run(stage, issuer.mint(ttl=-3))  # leeway 5 s in the fixture config
    assert d is ALLOW
    d, _ = await run(stage, issuer.mint(claims={"nbf": int(time.time()) + 3}))
    assert d is ALLOW


# -- not our credential / malformed ----------------------------------------------------------


async def test_no_authorization_header_skips(stage):
    f = stage.filters_for_route(stage_route())[0]
    assert await f.check(make_ctx()) is SKIP
    assert await f.check(make_ctx("Basic dXNlcjpwYXNz")) is SKIP


async def test_every_route_gets_the_filter_public_ones_too(stage):
    # A token presented on a public route is verified, never passed on unchecked.
    routes = config({}).routes
    assert [f.name for f in stage.filters_for_route(routes[0])] == ["tokens"]
    assert [f.name for f in stage.filters_for_route(routes[1])] == ["tokens"]


@pytest.mark.parametrize(
    "raw",
    [
        "Bearer",
        "Bearer ",
        "Bearer a.b",
        "Bearer a.b.c.d",
        "Bearer  {t}",
        "Bearer {t} ",
        "Bearer\t{t}",
        "Bearer {t}=",
        "Bearer e30.e30+.x",
        "Bearer !!!.e30.abc",
        "Bearer bm90IGpzb24.e30.abc",  # header not JSON
        "Bearer W10.e30.abc",  # header a JSON array
        "Bearer " + "a" * 20000 + ".b.c",
    ],
)
async def test_malformed_bearer_is_401(stage, issuer, raw):
    d, ctx = await run(stage, None, raw=raw.replace("{t}", issuer.mint()))
    denied(d, ctx, "token_malformed")


async def test_two_authorization_headers_are_malformed(stage, issuer):
    t = issuer.mint()
    ctx = make_ctx(f"Bearer {t}", f"Bearer {t}")
    d = await stage.filters_for_route(stage_route())[0].check(ctx)
    denied(d, ctx, "token_malformed")


async def test_duplicate_json_members_are_malformed(stage, issuer):
    key = issuer.signing_key
    head = b64(f'{{"alg":"RS256","kid":"{issuer.kid}","alg":"RS256"}}'.encode())
    body = b64(json.dumps({"iss": issuer.iss}).encode())
    d, ctx = await run(stage, f"{head}.{body}.abc")
    denied(d, ctx, "token_malformed")
    assert key is not None


# -- the attack table ------------------------------------------------------------------------


def hs256_with_public_key(issuer) -> str:
    pem = issuer.public_pem()
    claims = payload_of(issuer.mint())
    return forge(
        {"alg": "HS256", "typ": "JWT", "kid": issuer.kid},
        claims,
        lambda m: hmac.new(pem, m, hashlib.sha256).digest(),
    )


async def test_attacks_are_denied_with_precise_internal_reasons(stage, issuer, issuer_factory):
    attacker_key = new_rsa_key()
    attacker = await issuer_factory("maskinporten", name="attacker")
    base = payload_of(issuer.mint())
    none_token = (
        f"{b64(json.dumps({'alg': 'none', 'kid': issuer.kid}).encode())}.{b64(json.dumps(base).encode())}."
    )
    good = issuer.mint()
    cases = {
        "alg none": (none_token, "token_alg_not_allowed"),
        "alg None": (
            none_token.replace(
                b64(json.dumps({"alg": "none", "kid": issuer.kid}).encode()),
                b64(json.dumps({"alg": "None", "kid": issuer.kid}).encode()),
            ),
            "token_alg_not_allowed",
        ),
        "hs256 with the public key": (hs256_with_public_key(issuer), "token_alg_not_allowed"),
        "foreign key, issuer kid": (issuer.mint(key=attacker_key, kid=issuer.kid), "token_bad_signature"),
        "expired": (issuer.mint(ttl=-60), "token_expired"),
        "nbf in the future": (issuer.mint(claims={"nbf": int(time.time()) + 600}), "token_not_yet_valid"),
        "iat in the future": (issuer.mint(claims={"iat": int(time.time()) + 600}), "token_not_yet_valid"),
        "no exp": (issuer.mint(claims={"exp": None}), "token_claims_invalid"),
        "string exp": (issuer.mint(claims={"exp": "9999999999"}), "token_claims_invalid"),
        "wrong iss": (issuer.mint(iss="https://maskinporten.no/"), "token_unknown_issuer"),
        "iss differs by slash": (issuer.mint(iss=issuer.iss.rstrip("/")), "token_unknown_issuer"),
        "no iss": (issuer.mint(claims={"iss": None}), "token_unknown_issuer"),
        "jku to attacker": (
            issuer.mint(key=attacker.signing_key, kid=attacker.kid, headers={"jku": attacker.jwks_uri}),
            "token_unknown_kid",
        ),
        "x5u to attacker": (
            issuer.mint(key=attacker.signing_key, kid=issuer.kid, headers={"x5u": attacker.jwks_uri}),
            "token_bad_signature",
        ),
        "embedded jwk": (
            issuer.mint(
                key=attacker.signing_key, kid=issuer.kid, headers={"jwk": attacker.jwks()["keys"][0]}
            ),
            "token_bad_signature",
        ),
        "crit": (issuer.mint(headers={"crit": ["exp"], "exp": 1}), "token_crit_unsupported"),
        "truncated signature": (good[:-10], "token_bad_signature"),
        "empty signature": (good.rsplit(".", 1)[0] + ".", "token_bad_signature"),
        "signature of another token": (
            issuer.mint(org="958935420").rsplit(".", 1)[0] + "." + good.rsplit(".", 1)[1],
            "token_bad_signature",
        ),
        "idporten-shaped from maskinporten issuer": (
            issuer.mint(kind="idporten", pid=TEST_PID),
            "token_kind_mismatch",
        ),
        "maskinporten-shaped from idporten issuer": (
            issuer.idporten.mint(kind="maskinporten"),
            "token_kind_mismatch",
        ),
        "consumer not 0192 digits": (issuer.mint(org="12345"), "token_claims_invalid"),
        "consumer a string": (issuer.mint(claims={"consumer": "0192:991825827"}), "token_claims_invalid"),
        "scope a list": (issuer.mint(claims={"scope": ["ks:fiks"]}), "token_claims_invalid"),
        "pid not 11 digits": (issuer.idporten.mint(pid="1234"), "token_claims_invalid"),
        "PS256 not configured": (issuer.mint(alg="PS256"), "token_alg_not_allowed"),
    }
    for label, (token, internal) in cases.items():
        d, ctx = await run(stage, token)
        assert type(d) is Deny, label
        assert d.problem.internal_reason == internal, label
        denied(d, ctx, internal)
    assert attacker.fetch_count == 0


async def test_es256_header_against_an_rsa_kid_is_refused(issuer, issuer_factory):
    from cryptography.hazmat.primitives.asymmetric import ec

    s = await make_stage({"m": issuer.config(algorithms=["RS256", "ES256"])})
    try:
        eckey = ec.generate_private_key(ec.SECP256R1())
        d, ctx = await run(s, issuer.mint(key=eckey, kid=issuer.kid, alg="ES256"))
        denied(d, ctx, "token_alg_not_allowed")
    finally:
        await s.close()


async def test_audience_checked_when_configured(issuer):
    s = await make_stage({"m": issuer.config(audience="https://portvakt.example/api")})
    try:
        for aud, ok in [
            ("https://portvakt.example/api", True),
            (["other", "https://portvakt.example/api"], True),
            ("https://other.example/", False),
            (None, False),
        ]:
            d, ctx = await run(s, issuer.mint(audience=aud))
            if ok:
                assert d is ALLOW, aud
            else:
                denied(d, ctx, "token_bad_audience")
    finally:
        await s.close()


async def test_foreign_audience_refused_by_default_config(stage, issuer):
    d, ctx = await run(stage, issuer.mint(audience="anything"))
    denied(d, ctx, "token_bad_audience")
