"""Identity forwarding end to end: spoofed identity headers never reach the upstream, verified ones
do, and the signed assertion verifies against the admin JWKS (also across a key rotation)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import jwt
import pytest

from gateway.identity import keys_create, keys_rotate
from tests.fixtures.gateway import basic_config

ORG = "991825827"
TARGET = "958935420"
SPOOF = "SPOOFED-VALUE"

IDENTITY_HEADERS = [
    "X-Portvakt-Consumer-Org",
    "X-Portvakt-Integration-Id",
    "X-Portvakt-Integration-Org",
    "X-Portvakt-Certificate-Org",
    "X-Portvakt-Scope",
    "X-Portvakt-Acr",
    "X-Portvakt-Client-Amr",
    "X-Portvakt-Target-Org",
    "X-Portvakt-Legal-Basis",
    "X-Portvakt-Person",
    "X-Portvakt-Assertion",
    "X-Portvakt-Something-New",
    "Client-Cert",
    "Client-Cert-Chain",
]


def spellings(name: str) -> list[str]:
    """The same header in several cases, with '_' for '-' (some servers fold them together)."""
    return [name.lower(), name.upper(), name.replace("-", "_"), name.swapcase().replace("-", "_")]


def config(upstream_url: str, issuer, **identity) -> dict:
    cfg = basic_config(upstream_url, issuers=issuer.issuers_config())
    cfg["upstreams"]["case"] = cfg["upstreams"].pop("demo")
    cfg["routes"] = [
        {
            "name": "cases",
            "upstream": "case",
            "service": "saksbehandling",
            "legal_basis": "forvaltningsloven § 13b",
            "match": {"path_prefix": "/orgs/"},
            "organization_from": "path:/orgs/{organization}/",
            "forward": {"person": True, "client_cert": True},
            "access": {"any_of": [{"organizations": [ORG], "scopes": ["ks:fiks"]}, {"person": True}]},
        }
    ]
    if identity:
        cfg["identity"] = identity
    return cfg


async def jwks(gw) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/.well-known/jwks.json") as r:
            assert r.status == 200
            return await r.json()


def verify_assertion(token: str, keys: dict, **kw) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in keys["keys"] if k["kid"] == kid)
    return jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="case", issuer="portvakt", **kw
    )


async def test_spoofed_identity_headers_never_reach_upstream(start_gateway, upstream, issuer, pki):
    gw = await start_gateway(config(upstream.url, issuer))
    token = issuer.mint(org=ORG, scope="ks:fiks")
    spoofed: list[tuple[str, str]] = [("Authorization", f"Bearer {token}")]
    for name in IDENTITY_HEADERS:
        spoofed += [(n, SPOOF) for n in spellings(name)]
    cert, key = pki.client_seid2_cert, pki.client_seid2_key
    async with gw.session(cert, key) as s:
        async with s.get(gw.url + f"/orgs/{TARGET}/cases", headers=spoofed) as r:
            assert r.status == 200, await r.text()
            rid = r.headers["X-Request-Id"]
    [seen] = upstream.requests
    h = seen["headers"]
    assert SPOOF not in json.dumps(list(h.items()))
    assert h["X-Portvakt-Consumer-Org"] == ORG
    assert h["X-Portvakt-Certificate-Org"] == ORG
    assert h["X-Portvakt-Target-Org"] == TARGET
    assert h["X-Portvakt-Scope"] == "ks:fiks"
    assert h["X-Portvakt-Legal-Basis"] == "forvaltningsloven %C2%A7 13b"
    assert h.getall("X-Portvakt-Consumer-Org") == [ORG]
    assert h["Client-Cert"].startswith(":") and h["Client-Cert"].endswith(":")
    assert "X-Portvakt-Person" not in h and "X-Portvakt-Something-New" not in h
    claims = verify_assertion(h["X-Portvakt-Assertion"], await jwks(gw))
    assert "request_id" not in claims and h["X-Request-Id"] == rid  # per request: the header
    assert claims["consumer_org"] == ORG and claims["target_org"] == TARGET
    assert claims["certificate_org"] == ORG and claims["route"] == "cases"


async def test_person_forwarded_on_opt_in_route(start_gateway, upstream, issuer):
    gw = await start_gateway(config(upstream.url, issuer))
    token = issuer.idporten.mint()
    async with gw.session() as s:
        async with s.get(
            gw.url + f"/orgs/{TARGET}/x",
            headers={"Authorization": f"Bearer {token}", "x_portvakt_person": SPOOF},
        ) as r:
            assert r.status == 200, await r.text()
    h = upstream.requests[0]["headers"]
    from tests.fixtures.issuer import TEST_PID

    assert h.getall("X-Portvakt-Person") == [TEST_PID]
    assert h["X-Portvakt-Acr"] == "idporten-loa-high"
    assert verify_assertion(h["X-Portvakt-Assertion"], await jwks(gw))["pid"] == TEST_PID


async def test_assertion_survives_rotation_and_expires(start_gateway, upstream, issuer, tmp_path):
    kd = tmp_path / "assertion-keys"
    old_kid = keys_create(str(kd), max_lifetime=60)
    gw = await start_gateway(
        config(
            upstream.url,
            issuer,
            assertion={"key_dir": str(kd), "lifetime_seconds": 3, "manifest_poll_seconds": 0.1},
        )
    )
    token = issuer.mint(org=ORG, scope="ks:fiks")

    async def assertion() -> str:
        upstream.clear()
        async with gw.session() as s:
            async with s.get(gw.url + f"/orgs/{TARGET}/a", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
        return upstream.requests[0]["headers"]["X-Portvakt-Assertion"]

    old = await assertion()
    assert jwt.get_unverified_header(old)["kid"] == old_kid
    new_kid = keys_rotate(str(kd), publish_delay=0)
    for _ in range(100):  # the gateway polls the manifest; no reload needed
        if any(k["kid"] == new_kid for k in (await jwks(gw))["keys"]):
            break
        await asyncio.sleep(0.05)
    new = await assertion()
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    keys = await jwks(gw)
    assert {k["kid"] for k in keys["keys"]} == {old_kid, new_kid}
    old_claims = verify_assertion(old, keys)  # signed with the old key, still valid until it expires
    verify_assertion(new, keys)
    assert old_claims["exp"] - old_claims["iat"] == 3
    await asyncio.sleep(max(0.0, old_claims["exp"] - time.time()) + 1.05)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify_assertion(old, keys)
