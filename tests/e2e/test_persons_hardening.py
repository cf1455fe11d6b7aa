"""An attacker's look at persons' login (issue 15 follow-ups): logout CSRF, the login endpoints
behind ingress and a rate limit, cookie and cache headers, the forward-auth endpoint."""

from __future__ import annotations

import re

import aiohttp
import pytest

from tests.fixtures.persons_http import HttpBrowser

SESSION = "__Host-portvakt-session"


async def _logged_in(b: HttpBrowser) -> bool:
    r = await b.get(b.gw.url + "/app/")
    return r.status == 200


@pytest.fixture
async def env(persons_env):
    return await persons_env()


async def test_logout_csrf_cross_site_get_or_post_does_not_end_the_session(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        url = env.url + "/portvakt/logout"
        # A cross-site <img src> / top-level GET: only a confirmation page, nothing ended.
        r = await b.get(url, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        page = await r.text()
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert SESSION not in r.headers.get("Set-Cookie", "")
        assert await _logged_in(b)
        # Cross-site POSTs: by Sec-Fetch-Site, by Origin, without either (no token), even with
        # the right token when the browser says cross-site.
        for headers, data in (
            ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, {}),
            ({"Sec-Fetch-Site": "same-site"}, {}),
            ({"Origin": "https://evil.example"}, {}),
            ({"Origin": "null"}, {}),
            ({}, {}),
            ({}, {"csrf": "0" * 64}),
            ({"Sec-Fetch-Site": "cross-site"}, {"csrf": token}),
        ):
            async with b.session.post(url, headers=headers, data=data, allow_redirects=False) as r:
                body = await r.text()
                assert r.status == 403, (headers, r.status)
                assert "id_token_hint" not in body
                assert not any(SESSION in v for v in r.headers.getall("Set-Cookie", ()))
            assert await _logged_in(b), headers
        await env.settle()
        assert not [e for e in env.audit() if e.get("type") == "logout_rp"]
        # The token alone (a client that sends no Origin/Sec-Fetch-Site) works.
        async with b.session.post(url, data={"csrf": token}, allow_redirects=False) as r:
            assert r.status == 200 and "id_token_hint" in await r.text()
        assert not await _logged_in(b)
    finally:
        await b.close()


async def test_logout_same_origin_post_without_token_works(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        async with b.session.post(env.url + "/portvakt/logout", allow_redirects=False,
                                  headers={"Sec-Fetch-Site": "same-origin", "Origin": env.url}) as r:
            assert r.status == 200 and "id_token_hint" in await r.text()
        assert not await _logged_in(b)
        ev = await env.events("logout_rp")
        assert len(ev) == 1
    finally:
        await b.close()
