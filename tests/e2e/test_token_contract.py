"""Tokens fit for their audience, credentials that stay at the gate, certificate binding: the
real gateway over TLS with real client certificates from the dev CA, real local issuers and a
recording upstream."""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.helpers_identity import (
    GRANTING_ORG,
    INTEGRATION_ID,
    ORG_URL,
    OWNER_ORG,
    PASSWORD,
    PERSON_URL,
    call,
    innsyn_route,
    integration_entry,
)
from tests.fixtures.gateway import basic_config

PERSON_PID = "24917397852"  # the issuer fixture's TEST_PID
PUBLIC = "/public/info"
RELAXED = "/relaxed/x"
PASS_ON = "/pass-on/x"
CREDENTIAL_NAMES = [
    "authorization",
    "AUTHORIZATION",
    "IntegrasjonId",
    "integrasjonid",
    "INTEGRASJONID",
    "Integrasjon-Id",
    "integrasjon_id",
    "IntegrasjonPassord",
    "integrasjonpassord",
    "INTEGRASJONPASSORD",
    "Integrasjon-Passord",
    "integrasjon_passord",
    "Integrasjon_Passord",
]


def routes() -> list[dict]:
    person_route = innsyn_route()
    return [
        person_route,
        {
            "name": "relaxed",
            "upstream": "demo",
            "match": {"path_prefix": "/relaxed/"},
            "access": {"any_of": [{"organizations": [OWNER_ORG]}], "allow_certificate_org_mismatch": True},
        },
        {
            "name": "pass-on",
            "upstream": "demo",
            "match": {"path_prefix": "/pass-on/"},
            "forward": {"bearer_token": True},
            "access": {"any_of": [{"organizations": [OWNER_ORG]}, {"person": True}]},
        },
        {"name": "public", "upstream": "demo", "match": {"path_prefix": "/"}},
    ]


def config(upstream_url: str, issuer) -> dict:
    return basic_config(
        upstream_url,
        issuers=issuer.issuers_config(),
        integrations=[integration_entry()],
        routes=routes(),
        integrations_policy={"password_hash_floor": "none"},  # the cheap test hash is below the floor
    )


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def integration(token: str) -> dict[str, str]:
    return auth(token, IntegrasjonId=INTEGRATION_ID, IntegrasjonPassord=PASSWORD)


def der_thumbprint(cert_path: str) -> str:
    with open(cert_path, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


async def test_id_tokens_and_foreign_audiences_refused_on_every_route_kind(start_gateway, upstream, issuer):
    gw = await start_gateway(config(upstream.url, issuer))
    mp, ip = issuer, issuer.idporten
    foreign = {
        "idporten id_token of another client": ip.mint(
            audience="other-client", claims={"nonce": "n", "azp": "other-client"}
        ),
        "idporten id_token with our audience": ip.mint(claims={"nonce": "n", "at_hash": "x"}),
        "idporten id_token typ": ip.mint(headers={"typ": "id_token"}),
        "idporten token for another API": ip.mint(audience="https://other-api.example/"),
        "idporten token without aud": ip.mint(audience=None),
        "maskinporten token for another API": mp.mint(audience="https://other-api.example/"),
        "maskinporten token without aud": mp.mint(audience=None),
        "logout token": ip.mint(headers={"typ": "logout+jwt"}),
    }
    urls = {
        "integration route": (ORG_URL.format(org=GRANTING_ORG), True),
        "person route": (PERSON_URL.format(pid=PERSON_PID), False),
        "public route": (PUBLIC, False),
        "opt-in route": (PASS_ON, False),
    }
    async with gw.session() as s:
        for what, token in foreign.items():
            for kind, (url, with_integration) in urls.items():
                headers = integration(token) if with_integration else auth(token)
                status, body, h = await call(s, gw.url + url, headers)
                assert status == 401, (what, kind, status, body)
                assert body["reason"] == "invalid_token", (what, kind)
        assert upstream.started == 0
        # The controls: the same shapes with our audience pass.
        assert (await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), integration(mp.mint())))[0] == 200
        assert (await call(s, gw.url + PERSON_URL.format(pid=PERSON_PID), auth(ip.mint())))[0] == 200
    assert "token_not_access_token" in await gw.metrics_text()


async def test_upstream_never_sees_consumed_credentials(start_gateway, upstream, issuer):
    gw = await start_gateway(config(upstream.url, issuer))
    token = issuer.mint()
    async with gw.session() as s:
        # Integration route: every spelling of every credential header is removed.
        extra = [(n, "x") for n in CREDENTIAL_NAMES if not n.lower().startswith("authorization")]
        async with s.get(
            gw.url + ORG_URL.format(org=GRANTING_ORG),
            headers=[
                ("Authorization", f"Bearer {token}"),
                ("IntegrasjonId", INTEGRATION_ID),
                ("IntegrasjonPassord", PASSWORD),
            ],
        ) as r:
            assert r.status == 200, await r.text()
        # Public route: a verified token and loose integration headers, in every spelling.
        async with s.get(gw.url + PUBLIC, headers=[("Authorization", f"Bearer {token}"), *extra]) as r:
            assert r.status == 200, await r.text()
        # Another scheme (Basic) on a public route: Portvakt cannot verify it, so it stays here.
        async with s.get(gw.url + PUBLIC, headers={"Authorization": "Basic dXNlcjpwYXNz"}) as r:
            assert r.status == 200
    assert len(upstream.requests) == 3
    for rec in upstream.requests:
        names = {k.lower().replace("_", "-") for k in rec["headers"]}
        assert not names & {
            "authorization",
            "integrasjonid",
            "integrasjon-id",
            "integrasjonpassord",
            "integrasjon-passord",
        }, rec["headers"]
        assert token not in json.dumps(list(rec["headers"].items()))
    # The upstream learns who called from the verified facts instead.
    assert upstream.requests[0]["headers"]["X-Portvakt-Integration-Id"] == INTEGRATION_ID
    assert upstream.requests[1]["headers"]["X-Portvakt-Consumer-Org"] == OWNER_ORG


async def test_opt_in_route_forwards_only_the_verified_token(start_gateway, upstream, issuer):
    gw = await start_gateway(config(upstream.url, issuer))
    token = issuer.mint()
    async with gw.session() as s:
        async with s.get(gw.url + PASS_ON, headers=integration(token)) as r:
            assert r.status == 200, await r.text()
        # Duplicate headers are not one verified token: refused, nothing forwarded.
        async with s.get(
            gw.url + PASS_ON,
            headers=[("Authorization", f"Bearer {token}"), ("authorization", "Bearer forged.x.y")],
        ) as r:
            assert r.status == 401
    [rec] = upstream.requests
    assert rec["headers"].getall("Authorization") == [f"Bearer {token}"]
    names = {k.lower() for k in rec["headers"]}
    assert "integrasjonpassord" not in names and "integrasjonid" not in names


async def test_forged_tokens_on_public_routes(start_gateway, upstream, issuer, issuer_factory):
    gw = await start_gateway(config(upstream.url, issuer))
    attacker = await issuer_factory("maskinporten", name="attacker")
    good = issuer.mint()
    head, payload, _ = good.split(".")
    forged = {
        "unsigned (alg none)": base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
        + f".{payload}.",
        "signature stripped": f"{head}.{payload}.",
        "signed by someone else": attacker.mint(iss=issuer.iss, kid=issuer.kid, key=attacker.signing_key),
        "expired": issuer.mint(ttl=-300),
        "garbage": "not-a-jwt",
        "unknown issuer": attacker.mint(),
    }
    async with gw.session() as s:
        for label, token in forged.items():
            status, body, h = await call(s, gw.url + PUBLIC, auth(token))
            assert status == 401, (label, status, body)
            assert h["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert upstream.started == 0
        assert (await call(s, gw.url + PUBLIC, auth(good)))[0] == 200
        assert (await call(s, gw.url + PUBLIC))[0] == 200  # no credential: a public route stays public


async def test_certificate_and_token_must_name_the_same_org(start_gateway, upstream, issuer, pki):
    gw = await start_gateway(config(upstream.url, issuer))
    owner_cert = (pki.client_seid2_cert, pki.client_seid2_key)  # OWNER_ORG
    other_cert = (pki.client_seid1_cert, pki.client_seid1_key)  # GRANTING_ORG
    token = issuer.mint(org=OWNER_ORG)
    async with gw.session(*other_cert) as s:
        for url in (PASS_ON, PUBLIC):
            status, body, _ = await call(s, gw.url + url, auth(token))
            assert status == 401, (url, status, body)
        # The route that relaxes it explicitly admits the pair; both orgs reach the upstream.
        status, _, _ = await call(s, gw.url + RELAXED, auth(token))
        assert status == 200
    async with gw.session(*owner_cert) as s:
        assert (await call(s, gw.url + PASS_ON, auth(token)))[0] == 200
    assert len(upstream.requests) == 2
    h = upstream.requests[0]["headers"]
    assert (h["X-Portvakt-Consumer-Org"], h["X-Portvakt-Certificate-Org"]) == (OWNER_ORG, GRANTING_ORG)
    assert "token_certificate_org_mismatch" in await gw.metrics_text()


async def test_certificate_bound_token_rfc8705(start_gateway, upstream, issuer, pki):
    gw = await start_gateway(config(upstream.url, issuer))
    c, k = pki._pki.issue_client(OWNER_ORG, 2, label="cnf-bound")  # a second certificate of the same org
    cert, key = str(c), str(k)
    assert der_thumbprint(cert) != der_thumbprint(pki.client_seid2_cert)
    bound = issuer.mint(org=OWNER_ORG, claims={"cnf": {"x5t#S256": der_thumbprint(cert)}})
    async with gw.session(cert, key) as s:
        assert (await call(s, gw.url + PASS_ON, auth(bound)))[0] == 200
        assert (await call(s, gw.url + PUBLIC, auth(bound)))[0] == 200
    # Same org, another certificate: the token was bound to the first one.
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:
        status, body, _ = await call(s, gw.url + PASS_ON, auth(bound))
        assert status == 401 and body["reason"] == "invalid_token"
    async with gw.session() as s:  # no client certificate at all
        assert (await call(s, gw.url + PASS_ON, auth(bound)))[0] == 401
    assert len(upstream.requests) == 2
    assert "token_cnf_mismatch" in await gw.metrics_text()
