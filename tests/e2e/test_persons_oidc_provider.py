"""Persons' login against an OpenID Provider Portvakt does not own: npm oidc-provider (panva),
driven through headless Chromium. Generic OIDC: code + PKCE + PAR, RFC 9207 iss, client auth
(private_key_jwt, client_secret_basic, client_secret_post), id_token validation, refresh,
RP-initiated logout. (ID-porten specifics run against gateway.dev.provider.)"""

from __future__ import annotations

import asyncio
import json

import jwt
import pytest

from tests.fixtures.oidc_provider import gateway_client
from tests.fixtures.persons import COOKIE_SECRET


async def _setup(
    start_gateway,
    upstream,
    oidc_provider,
    client_key,
    tmp_path,
    auth="private_key_jwt",
    access_ttl=120,
    provider_extra=None,
    **persons,
):
    key, key_file = client_key
    op = oidc_provider()
    provider = {"issuer": op.issuer, "client_id": "portvakt", "client_auth": auth, "timeout_seconds": 3}
    provider.update(provider_extra or {})
    secret = "oidc-provider-client-secret-0123456789"
    if auth == "private_key_jwt":
        provider.update(client_key_file=key_file, client_key_id="portvakt-key-1")
    else:
        provider["client_secret"] = secret
    cfg = {
        "upstreams": {"app": {"url": upstream.url}},
        "routes": [
            {
                "name": "app",
                "match": {"path_prefix": "/app/"},
                "upstream": "app",
                "person": {},
                "forward": {"person": True},
            },
            {"name": "public", "match": {"path_prefix": "/"}, "upstream": "app"},
        ],
        "persons": {"provider": provider, "cookie_keys": [{"id": "k1", "secret": COOKIE_SECRET}], **persons},
        "audit": {
            "path": str(tmp_path / "audit" / "audit.jsonl"),
            "key": "test-audit-key-0123456789",
            "fsync": False,
        },
    }
    gw = await start_gateway(cfg, wait_ready=False)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.pop("key_ops", None)
    jwk.update(kid="portvakt-key-1", use="sig", alg="RS256")
    await op.start([gateway_client(gw.port, auth, jwk=jwk, secret=secret)], access_ttl=access_ttl)
    await gw.wait_ready()
    return op, gw


async def _login(page, gw_url: str, op, path: str = "/app/start?q=1") -> None:
    await page.goto(gw_url + path)
    assert page.url.startswith(op.issuer + "/interaction/"), page.url
    await page.click("#login")
    try:
        await page.wait_for_url(gw_url + path)
    except Exception:
        raise AssertionError(f"ended on {page.url}: {(await page.content())[:2000]}") from None


@pytest.mark.parametrize("auth", ["private_key_jwt", "client_secret_basic", "client_secret_post"])
async def test_login_with_oidc_provider(
    start_gateway, upstream, oidc_provider, client_key, tmp_path, chromium, auth
):
    op, gw = await _setup(start_gateway, upstream, oidc_provider, client_key, tmp_path, auth=auth)
    ctx = await chromium()
    page = await ctx.new_page()
    await _login(page, gw.url, op)
    doc = json.loads(await page.inner_text("body"))
    assert doc["headers"]["X-Portvakt-Acr"] == "idporten-loa-substantial"
    assert doc["headers"]["X-Portvakt-Person"] == "24917397852"
    assert doc["headers"]["Authorization"].startswith("Bearer ")
    assert "portvakt" not in doc["headers"].get("Cookie", "")
    assert (await op.counters())["code"] == 1


async def test_refresh_and_rp_logout_with_oidc_provider(
    start_gateway, upstream, oidc_provider, client_key, tmp_path, chromium
):
    # oidc-provider takes POST at end_session only with SameSite=None cookies (https); GET here.
    op, gw = await _setup(
        start_gateway,
        upstream,
        oidc_provider,
        client_key,
        tmp_path,
        access_ttl=3,
        refresh_leeway_seconds=1,
        provider_extra={"end_session_method": "get"},
    )
    ctx = await chromium()
    page = await ctx.new_page()
    await _login(page, gw.url, op)
    tokens = set()
    for _ in range(3):
        await asyncio.sleep(1.5)
        await page.goto(gw.url + "/app/again")
        tokens.add(json.loads(await page.inner_text("body"))["headers"]["Authorization"])
    assert (await op.counters())["refresh"] >= 1 and len(tokens) >= 2
    # RP-initiated logout: the OP asks for confirmation, then sends the browser back with state.
    await page.goto(gw.url + "/portvakt/logout")
    await page.click("#logout-confirm")
    await page.wait_for_url(op.issuer + "/**")
    try:
        await page.click("#logout-yes")
    except Exception:
        raise AssertionError(f"on {page.url}: {(await page.content())[:1500]}") from None
    await page.wait_for_url(gw.url + "/")
    await page.goto(gw.url + "/app/")
    assert page.url.startswith(op.issuer + "/interaction/")
