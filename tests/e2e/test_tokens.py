"""Bearer tokens end to end: the real gateway process over TLS, real local JWKS issuers, a real
upstream. Every attack is a 401 that never reaches the upstream; key rotation and issuer outages
behave as the issue says."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.dev.issuer import DEV_AUDIENCE, DEV_MASKINPORTEN_ISS
from tests.fixtures.gateway import basic_config
from tests.fixtures.issuer import TEST_PID, new_rsa_key

ROOT = Path(__file__).resolve().parents[2]
ORG = "991825827"
AUDIENCE = "https://portvakt.test/api"
PATH = "/api/v1/ping"


def config(upstream_url: str, issuers: dict[str, Any]) -> dict:
    cfg = basic_config(upstream_url, issuers=issuers)
    cfg["routes"] = [
        {
            "name": "api",
            "upstream": "demo",
            "match": {"path_prefix": "/api/"},
            "access": {"any_of": [{"organizations": [ORG], "scopes": ["ks:fiks"]}, {"person": True}]},
        }
    ]
    return cfg


async def get(gw, token: str | None = None, raw_auth: str | None = None) -> tuple[int, dict, Any]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_auth is not None:
        headers["Authorization"] = raw_auth
    async with gw.session() as s:
        async with s.get(gw.url + PATH, headers=headers) as r:
            raw = await r.read()
            body = (
                json.loads(raw) if r.headers.get("Content-Type", "").startswith("application/problem") else {}
            )
            return r.status, body, r.headers


async def readyz(gw) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/readyz") as r:
            return r.status, await r.json()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def forge(header: dict, payload: dict, sign) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


async def test_attack_table_is_401_and_never_reaches_upstream(
    start_gateway, upstream, issuer, issuer_factory
):
    attacker = await issuer_factory("maskinporten", name="attacker")
    issuers = {
        "maskinporten": issuer.config(jwks_refetch_min_seconds=30),
        "idporten": issuer.idporten.config(audience=AUDIENCE),
    }
    gw = await start_gateway(config(upstream.url, issuers))
    fetches_after_start = issuer.fetch_count
    good = issuer.mint()
    payload = claims_of(good)
    attacks = {
        "alg none": (
            forge({"alg": "none", "kid": issuer.kid}, payload, lambda m: b""),
            "token_alg_not_allowed",
        ),
        "HS256 signed with the RSA public key": (
            forge(
                {"alg": "HS256", "kid": issuer.kid},
                payload,
                lambda m: hmac.new(issuer.public_pem(), m, hashlib.sha256).digest(),
            ),
            "token_alg_not_allowed",
        ),
        "valid signature from a key not in the JWKS": (
            issuer.mint(key=new_rsa_key(), kid=issuer.kid),
            "token_bad_signature",
        ),
        "expired": (issuer.mint(ttl=-120), "token_expired"),
        "nbf in the future": (issuer.mint(claims={"nbf": int(time.time()) + 600}), "token_not_yet_valid"),
        "wrong iss": (issuer.mint(iss="https://maskinporten.no/"), "token_unknown_issuer"),
        "wrong aud": (issuer.idporten.mint(audience="https://elsewhere.example/"), "token_bad_audience"),
        "jku to an attacker JWKS": (
            issuer.mint(key=attacker.signing_key, kid=attacker.kid, headers={"jku": attacker.jwks_uri}),
            "token_unknown_kid",
        ),
        "x5u to an attacker JWKS": (
            issuer.mint(key=attacker.signing_key, kid=issuer.kid, headers={"x5u": attacker.jwks_uri}),
            "token_bad_signature",
        ),
        "truncated signature": (good[:-12], "token_bad_signature"),
        "token for the other issuer's kind": (
            issuer.mint(kind="idporten", pid=TEST_PID),
            "token_kind_mismatch",
        ),
        "malformed": ("abc.def", "token_malformed"),
        # Red team I1: absurd lifetimes (cached until exp before) are refused by max_token_lifetime_seconds.
        "exp 10^10 s ahead": (
            issuer.mint(claims={"exp": int(time.time()) + 10**10}),
            "token_lifetime_too_long",
        ),
        "exp 1e308": (issuer.mint(claims={"exp": 1e308}), "token_lifetime_too_long"),
    }
    bodies = []
    for label, (token, internal) in attacks.items():
        status, body, headers = await get(gw, token)
        assert status == 401, (label, status, body)
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', label
        assert body["reason"] == "invalid_token" and body["detail"] == "The bearer token is not valid.", label
        labels = {"filter": "tokens", "decision": "deny", "reason": internal}
        assert await gw.metric("portvakt_filter_decisions_total", labels) >= 1, label
        body.pop("request_id")
        bodies.append(body)
    assert all(b == bodies[0] for b in bodies)  # the client cannot tell the failures apart
    assert upstream.started == 0
    assert attacker.fetch_count == 0  # jku/x5u never followed
    # jku's unknown kid caused exactly one (throttled) refetch; more unknown kids cause none.
    assert issuer.fetch_count == fetches_after_start + 1
    for _ in range(3):
        status, _, _ = await get(gw, issuer.mint(key=new_rsa_key(), kid="made-up"))
        assert status == 401
    assert issuer.fetch_count == fetches_after_start + 1
    # The controls pass.
    assert (await get(gw, good))[0] == 200
    assert (await get(gw, issuer.idporten.mint(audience=AUDIENCE)))[0] == 200
    assert len(upstream.requests) == 2
    assert good not in gw.output() and TEST_PID not in gw.output()


async def test_verified_once_rotation_and_reload(start_gateway, upstream, issuer):
    cfg = config(upstream.url, issuer.issuers_config())
    gw = await start_gateway(cfg)
    token = issuer.mint()
    for _ in range(20):
        assert (await get(gw, token))[0] == 200
    assert await gw.metric("portvakt_token_verifications_total", {"result": "cache_hit"}) == 19
    assert await gw.metric("portvakt_token_verifications_total", {"result": "verified"}) == 1
    # Rotation: the issuer adds a key and signs with it -> accepted after exactly one refetch.
    before = issuer.fetch_count
    old = issuer.kid
    issuer.rotate()
    assert issuer.kid != old
    for _ in range(3):
        assert (await get(gw, issuer.mint()))[0] == 200
    assert issuer.fetch_count == before + 1
    # A reload with the issuer unchanged keeps its keys and verified tokens: no refetch.
    before = issuer.fetch_count
    cfg["routes"][0]["legal_basis"] = "changed"
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert (await get(gw, token))[0] == 200
    assert issuer.fetch_count == before
    assert await gw.metric("portvakt_token_verifications_total", {"result": "cache_hit"}) == 20
    assert len(upstream.requests) == 24


async def test_unreachable_issuer_after_startup_keeps_cached_keys(start_gateway, upstream, issuer):
    gw = await start_gateway(config(upstream.url, issuer.issuers_config()))
    assert (await get(gw, issuer.mint()))[0] == 200
    await issuer.unreachable()
    for _ in range(3):
        assert (await get(gw, issuer.mint(org=ORG)))[0] == 200  # new tokens, cached key
    await asyncio.sleep(0.3)
    assert (await get(gw, issuer.mint(key=new_rsa_key(), kid="new-kid")))[0] == 401  # refetch fails
    status, body = await readyz(gw)
    assert status == 200 and body  # still ready: stale keys are a fallback, not an outage
    assert (await get(gw, issuer.mint()))[0] == 200


async def test_never_reachable_issuer_is_503_then_recovers(start_gateway, upstream, issuer):
    await issuer.unreachable()
    gw = await start_gateway(config(upstream.url, issuer.issuers_config()), wait_ready=False)
    for _ in range(200):
        try:
            status, body = await readyz(gw)
            break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    assert status == 503
    assert "down: " in json.dumps(body)
    for _ in range(200):  # the public listener comes up even while not ready
        try:
            status, body, headers = await get(gw, issuer.mint())
            break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    assert (status, body["reason"]) == (503, "issuer_keys_unavailable")
    assert "Retry-After" in headers
    assert upstream.started == 0
    await issuer.reachable()
    for _ in range(100):
        if (await readyz(gw))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert (await readyz(gw))[0] == 200
    assert (await get(gw, issuer.mint()))[0] == 200


async def test_dev_token_cli_against_jwks_file(start_gateway, upstream, pki):
    # `portvakt dev-token` runs while the gateway starts (both are slow to import).
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "dev-token",
        "--key",
        pki.issuer_key,
        "--org",
        ORG,
        "--scope",
        "ks:fiks",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    issuers = {
        "dev": {
            "kind": "maskinporten",
            "issuer": DEV_MASKINPORTEN_ISS,
            "jwks_file": pki.issuer_jwks,
            "audience": DEV_AUDIENCE,
        }
    }
    gw = await start_gateway(config(upstream.url, issuers))
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err
    token = out.decode().strip()
    assert claims_of(token)["consumer"]["ID"] == f"0192:{ORG}"
    assert claims_of(token)["aud"] == DEV_AUDIENCE  # minted for the audience the demo requires
    assert (await get(gw, token))[0] == 200
