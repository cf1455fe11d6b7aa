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
        async with b.session.post(
            env.url + "/portvakt/logout",
            allow_redirects=False,
            headers={"Sec-Fetch-Site": "same-origin", "Origin": env.url},
        ) as r:
            assert r.status == 200 and "id_token_hint" in await r.text()
        assert not await _logged_in(b)
        ev = await env.events("logout_rp")
        assert len(ev) == 1
    finally:
        await b.close()


# ------------------------------------------------------------------ ingress and rate limit


async def test_a_denied_cidr_cannot_reach_the_login_endpoints_and_is_audited_once(persons_env):
    env = await persons_env(config_hook=lambda c: c.update(ingress={"deny_cidrs": ["127.0.0.0/8"]}))
    async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for path in (
            "/portvakt/login?redirect=/app/",
            "/portvakt/callback?state=x&code=y",
            "/portvakt/session",
            "/portvakt/logout",
            "/portvakt/auth",
        ):
            async with s.get(env.url + path, allow_redirects=False) as r:
                assert r.status == 403, (path, r.status)
                assert (await r.json())["type"].endswith("ip_denied")
                assert "Set-Cookie" not in r.headers
    await env.settle()
    recs = [x for x in env.audit() if x.get("type") == "request"]
    assert len(recs) == 5 and all(x["status"] == 403 and x["reason"] == "ip_in_deny_list" for x in recs), [
        (x["status"], x.get("reason")) for x in recs
    ]
    assert not [x for x in env.audit() if x.get("type", "").startswith("login")]


async def test_host_and_method_allow_lists_apply_to_the_login_endpoints(persons_env):
    env = await persons_env(
        config_hook=lambda c: c.update(
            ingress={"allowed_hosts": ["login.example.invalid"], "allowed_methods": ["GET", "HEAD", "POST"]}
        )
    )
    async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(env.url + "/portvakt/login", allow_redirects=False) as r:
            assert r.status == 421
    env2 = await persons_env(config_hook=lambda c: c.update(ingress={"max_header_bytes": 2048}))
    async with env2.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(
            env2.url + "/portvakt/login", headers={"X-Pad": "a" * 4000}, allow_redirects=False
        ) as r:
            assert r.status == 431
        async with s.request("PUT", env2.url + "/portvakt/logout", allow_redirects=False) as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]


async def test_a_flood_of_login_starts_and_callbacks_gets_429_per_client_ip(persons_env):
    env = await persons_env(
        login_loop_limit=100000,
        rate_limits=[{"per": "client_ip", "limit": 5, "period_seconds": 3600, "stage": "pre_auth"}],
    )
    statuses = []
    async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for _ in range(8):  # each without a cookie: the per-browser login-loop guard never sees it
            async with s.get(env.url + "/portvakt/login?redirect=/app/", allow_redirects=False) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["type"].endswith("rate_limited")
        # Login and callback share the budget: a callback flood is refused before any state lookup.
        async with s.get(env.url + "/portvakt/callback?state=x&code=y", allow_redirects=False) as r:
            assert r.status == 429
        # Other endpoints (front-channel logout, session) are not limited by it.
        async with s.get(env.url + "/portvakt/logout/frontchannel?iss=x&sid=y") as r:
            assert r.status == 200
    assert statuses[:5] == [302] * 5 and statuses[5:] == [429] * 3, statuses
    await env.settle()
    limited = [x for x in env.audit() if x.get("status") == 429]
    assert len(limited) == 4


# ------------------------------------------------------------------ cookies and caches


async def test_a_custom_cookie_name_is_never_forwarded_upstream(persons_env):
    """cookie_name need not contain "portvakt": the strip filter once skipped such cookies."""
    env = await persons_env(cookie_name="__Host-sess")
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        ticket = b.cookie("__Host-sess")
        assert ticket
        r = await b.get(env.url + "/app/")
        assert r.status == 200
        for path in ("/app/", "/public"):
            async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
                # Split over two Cookie header lines, as HTTP/1.1 clients may send them.
                hdrs = [("Cookie", "a=1"), ("Cookie", f"__Host-sess={ticket}; b=2")]
                async with raw.get(env.url + path, headers=hdrs, allow_redirects=False) as r:
                    assert r.status == 200, (path, r.status)
            sent = env.up.requests[-1]["headers"].getall("Cookie", [])
            assert sent == ["a=1; b=2"], sent
            assert ticket not in str(dict(env.up.requests[-1]["headers"]))
    finally:
        await b.close()


async def test_person_route_responses_are_no_store_even_when_the_upstream_says_public(persons_env, upstream):
    env = await persons_env()
    upstream.response_headers = {"Cache-Control": "public, max-age=3600"}
    b = HttpBrowser(env.gw)
    try:
        r = await b.get(env.url + "/app/")  # the redirect to login
        assert r.status == 302 and r.headers["Cache-Control"] == "no-store"
        await b.login()
        r = await b.get(env.url + "/app/")
        assert r.status == 200 and r.headers.getall("Cache-Control") == ["no-store"]
        for path in ("/portvakt/session", "/portvakt/logout", "/portvakt/auth"):
            r = await b.get(env.url + path)
            assert r.status in (200, 204) and r.headers["Cache-Control"] == "no-store", path
        r = await b.get(env.url + "/public")  # not a person route: the upstream decides
        assert r.headers["Cache-Control"] == "public, max-age=3600"
    finally:
        await b.close()


async def test_a_cross_site_link_to_login_with_prompt_login_does_not_log_the_person_out(env):
    """GET /portvakt/login?prompt=login ends the local session first: from another site (an
    <img> or a link), that was a logout by GET."""
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        for site in ("cross-site", "same-site"):
            r = await b.get(
                env.url + "/portvakt/login?prompt=login&redirect=/app/", headers={"Sec-Fetch-Site": site}
            )
            assert r.status == 302
            assert not any(SESSION in v and "Max-Age=0" in v for v in r.headers.getall("Set-Cookie", ()))
            assert await _logged_in(b), site
        # From the gateway's own pages it still ends the session first.
        r = await b.get(
            env.url + "/portvakt/login?prompt=login&redirect=/app/", headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert r.status == 302 and not await _logged_in(b)
    finally:
        await b.close()


async def test_cross_site_post_to_session_refresh_is_refused(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        grants = env.op.grants["refresh_token"]
        for hdrs in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
            async with b.session.post(env.url + "/portvakt/session/refresh", headers=hdrs) as r:
                assert r.status == 403 and (await r.json())["type"].endswith("cross_site_refused")
        assert env.op.grants["refresh_token"] == grants
        async with b.session.post(
            env.url + "/portvakt/session/refresh", headers={"Sec-Fetch-Site": "same-origin"}
        ) as r:
            assert r.status == 200 and (await r.json())["session"]["active"] is True
        assert env.op.grants["refresh_token"] == grants + 1
    finally:
        await b.close()


async def test_step_up_gives_a_new_session_id_and_the_old_ticket_is_dead(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        before = b.cookie(SESSION)
        r = await b.get(env.url + "/app/high/")
        assert r.status == 302
        cb = await b.authorize(
            r.headers["Location"]
            if r.headers["Location"].startswith("http")
            else (await b.get(env.url + r.headers["Location"])).headers["Location"],
            acr="idporten-loa-high",
        )
        r = await b.get(cb)
        assert r.status == 302
        after = b.cookie(SESSION)
        assert after and after != before
        async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
            async with raw.get(env.url + "/portvakt/session", headers={"Cookie": f"{SESSION}={before}"}) as r:
                assert r.status == 401
            async with raw.get(env.url + "/portvakt/session", headers={"Cookie": f"{SESSION}={after}"}) as r:
                assert r.status == 200 and (await r.json())["acr"] == "idporten-loa-high"
    finally:
        await b.close()


async def test_an_upstream_cannot_set_or_clear_the_gateways_cookies(persons_env, upstream):
    """Red team 2, F06: every backend shares the gateway's origin; one that answers with a
    Set-Cookie for the session or login cookie (or Clear-Site-Data: "cookies") could plant its own
    session in a person's browser or log the person out. Those headers are dropped; the upstream's
    own cookies pass."""
    from multidict import CIMultiDict

    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        upstream.response_headers = CIMultiDict(
            [
                ("Set-Cookie", "__Host-portvakt-session=planted; Path=/; Secure; HttpOnly"),
                ("Set-Cookie", " __host-PORTVAKT-login=planted; Path=/; Secure"),
                ("Set-Cookie", "app=1; Path=/"),
                ("Clear-Site-Data", '"cache", "cookies"'),
            ]
        )
        r = await b.get(env.url + "/app/")
        assert r.status == 200, env.gw.output()[-3000:]
        assert r.headers.getall("Set-Cookie", []) == ["app=1; Path=/"]
        assert "Clear-Site-Data" not in r.headers
        upstream.response_headers = {}
        r = await b.get(env.url + "/app/")
        assert r.status == 200  # still the person's own session
    finally:
        await b.close()
