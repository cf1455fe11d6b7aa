"""Persons' sessions over real sockets: refresh (one grant for 20 parallel requests across two
workers on Redis), provider errors, idle/absolute timeouts, prompt=login, locale, the login-loop
guard, Redis outage, and wonderwall's open-redirect corpus."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from tests.fixtures.persons_http import HttpBrowser

SESSION = "__Host-portvakt-session"
CORPUS = Path(__file__).with_name("data") / "open-redirects.txt"


async def _json(b: HttpBrowser, url: str, **kw):
    async with b.session.get(url, allow_redirects=False, **kw) as r:
        return r.status, r.headers, (await r.json(content_type=None) if r.status != 302 else None)


async def test_refresh_keeps_the_session_past_many_access_token_lifetimes(persons_env):
    env = await persons_env(op_kwargs={"access_ttl": 3}, refresh_leeway_seconds=1)
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        seen = set()
        for _ in range(5):
            status, _, doc = await _json(b, env.url + "/app/x")
            assert status == 200
            seen.add(doc["headers"]["Authorization"])
            await asyncio.sleep(1.5)
        assert env.op.grants["refresh_token"] >= 2 and len(seen) >= 3
        # The session endpoint shows when the tokens were refreshed (no tokens).
        status, _, s = await _json(b, env.url + "/portvakt/session")
        assert status == 200 and s["tokens"]["refreshed_at"] and "eyJ" not in str(s)
    finally:
        await b.close()


async def test_twenty_parallel_requests_at_expiry_make_one_refresh_across_two_workers(
    persons_env, shared_redis
):
    """The single-flight refresh lock, on a single Redis and on a three-master Redis Cluster."""
    # A 10 s token refreshed 5 s before expiry: stragglers have 5 s before the new one is due too.
    env = await persons_env(
        op_kwargs={"access_ttl": 10},
        refresh_leeway_seconds=5,
        workers=2,
        store={"backend": "redis", "url": shared_redis.url},
    )
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        cookie = b.cookie(SESSION)
        await asyncio.sleep(5.5)  # now inside the leeway: every request wants a refresh
        before = env.op.grants["refresh_token"]

        async def one(i: int) -> tuple[int, str]:
            # A connection each (force_close): SO_REUSEPORT spreads them over both workers.
            conn = aiohttp.TCPConnector(ssl=env.gw.ssl_context(), force_close=True)
            async with aiohttp.ClientSession(connector=conn, cookie_jar=aiohttp.DummyCookieJar()) as s:
                async with s.get(
                    env.url + f"/app/xhr/{i}",
                    headers={"Cookie": f"{SESSION}={cookie}", "Accept": "application/json"},
                ) as r:
                    doc = await r.json(content_type=None)
                    return r.status, doc.get("headers", {}).get("Authorization", "")

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert all(s == 200 for s, _ in results), results
        assert env.op.grants["refresh_token"] - before == 1
        assert len({a for _, a in results}) <= 2  # the old token (before) or the one new token
        # Redis holds only ciphertext: no token, no pid.
        values = await shared_redis.strings("portvakt:sess:*")
        assert values
        for _, v in values:
            assert b"eyJ" not in v and b"24917397852" not in v
    finally:
        await b.close()


async def test_refresh_refused_ends_session_server_errors_keep_it(persons_env):
    env = await persons_env(op_kwargs={"access_ttl": 2}, refresh_leeway_seconds=1)
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        await asyncio.sleep(1.5)
        # OP 5xx: 503, the session stays.
        env.op.refresh_failure = 503
        await asyncio.sleep(0.6)  # the current access token has expired too now
        status, headers, doc = await _json(b, env.url + "/app/x", headers={"Accept": "application/json"})
        assert status == 503 and doc["reason"] == "login_provider_unavailable" and "Retry-After" in headers
        env.op.refresh_failure = None
        status, _, doc = await _json(b, env.url + "/app/x")
        assert status == 200
        # OP 4xx (invalid_grant): the session ends; XHR 401 + Location, navigation 302 to login.
        await asyncio.sleep(1.5)
        env.op.refresh_failure = 400
        status, headers, doc = await _json(b, env.url + "/app/x", headers={"Accept": "application/json"})
        assert (
            status == 401 and doc["reason"] == "login_required" and "/portvakt/login" in headers["Location"]
        )
        env.op.refresh_failure = None
        r = await b.get(env.url + "/app/x")
        assert r.status == 302 and "/portvakt/login" in r.headers["Location"]
        ev = await env.events("refresh_failed", 2)
        assert [e.get("session_kept", False) for e in ev][-1] is False
    finally:
        await b.close()


async def test_idle_and_absolute_timeouts(persons_env):
    env = await persons_env(idle=3, absolute=7)
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        status, _, s = await _json(b, env.url + "/portvakt/session")
        assert (
            status == 200
            and 0 < s["session"]["timeout_in_seconds"] <= 3
            and 0 < s["session"]["ends_in_seconds"] <= 7
        )
        await asyncio.sleep(3.5)  # idle past the limit
        r = await b.get(env.url + "/app/")
        assert r.status == 302 and "/portvakt/login" in r.headers["Location"]
        # Activity does not stretch the absolute limit.
        await b.login()
        for _ in range(6):
            await asyncio.sleep(1.4)
            status, _, _doc = await _json(b, env.url + "/app/", headers={"Accept": "application/json"})
            if status != 200:
                break
        assert status == 401 and _doc["reason"] == "login_required"
    finally:
        await b.close()


async def test_prompt_login_forces_the_login_page_and_drops_the_local_session_first(persons_env):
    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        logins = env.op.logins
        r = await b.get(env.url + "/portvakt/login?prompt=login&redirect=/app/again")
        assert r.status == 302
        # The local session is gone before the browser is at the OP.
        async with b.session.get(
            env.url + "/app/", allow_redirects=False, headers={"Accept": "application/json"}
        ) as r2:
            assert r2.status == 401
        assert env.op.par_requests[-1]["prompt"] == "login"
        # The OP shows its login page again despite its SSO session; logging in there lands back.
        cb = await b.authorize(r.headers["Location"])
        assert env.op.logins == logins + 1
        r = await b.get(cb)
        assert r.status == 302 and r.headers["Location"] == "/app/again"
        ok = await env.events("login_success", 2)
        assert ok[-1]["prompt"] == "login"
    finally:
        await b.close()


async def test_route_prompt_login_and_locale_allow_list(persons_env):
    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        await b.get(env.url + "/portvakt/login?locale=en&redirect=/app/")
        assert env.op.par_requests[-1]["ui_locales"] == "en"
        await b.get(env.url + "/portvakt/login?locale=de&redirect=/app/")
        assert "ui_locales" not in env.op.par_requests[-1]
        await b.get(env.url + "/portvakt/login?level=Level4&redirect=/app/")
        assert env.op.par_requests[-1]["acr_values"] == "idporten-loa-high"
        # A route with prompt: login asks for it on the way to the OP.
        r = await b.get(env.url + "/app/fresh/")
        assert "prompt=login" in r.headers["Location"]
    finally:
        await b.close()


async def test_login_loop_guard_answers_429(persons_env):
    env = await persons_env(login_loop_limit=3, login_loop_window_seconds=60)
    b = HttpBrowser(env.gw)
    try:
        codes = [(await b.get(env.url + "/portvakt/login?redirect=/app/")).status for _ in range(5)]
        assert codes[:3] == [302, 302, 302] and codes[3:] == [429, 429]
        assert (await env.events("login_failure"))[-1]["reason"] == "login_loop"
    finally:
        await b.close()


async def test_redis_outage_gives_503_on_session_routes_never_anonymous(persons_env, redis_server):
    env = await persons_env(store={"backend": "redis", "url": redis_server.url, "timeout_seconds": 0.5})
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        status, _, _ = await _json(b, env.url + "/app/")
        assert status == 200
        os.kill(redis_server.pid, signal.SIGSTOP)  # Redis hangs: every call times out
        try:
            status, _, doc = await _json(b, env.url + "/app/", headers={"Accept": "application/json"})
            assert status == 503 and doc["reason"] == "session_store_unavailable"
            r = await b.get(env.url + "/app/")  # a navigation too: 503, not a login loop, not anonymous
            assert r.status == 503
            status, _, doc = await _json(b, env.url + "/public/x")
            assert status == 200 and "Authorization" not in doc["headers"]
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        for _ in range(40):  # back: the same session works again
            status, _, doc = await _json(b, env.url + "/app/")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and doc["headers"]["X-Portvakt-Person"] == "24917397852"
        redis_server.kill()  # gone entirely: still 503
        status, _, _ = await _json(b, env.url + "/app/", headers={"Accept": "application/json"})
        assert status == 503
    finally:
        await b.close()


async def test_open_redirect_corpus_always_lands_on_a_same_origin_path(persons_env):
    env = await persons_env(login_loop_limit=100000, max_open_attempts=100, rate_limits=[])
    lines = [ln.rstrip("\n") for ln in CORPUS.read_text(encoding="utf-8", errors="replace").splitlines()]
    assert len(lines) >= 550
    b = HttpBrowser(env.gw)
    try:
        await b.login()  # an SSO session at the OP: every further login is three requests
        origin = urlsplit(env.url)
        sem = asyncio.Semaphore(6)

        async def one(target: str) -> str | None:
            async with sem:
                r = await b.get(env.url + "/portvakt/login?redirect=" + quote(target, safe=""))
                if r.status != 302:
                    return f"{target!r}: login {r.status}"
                cb = await b.authorize(r.headers["Location"])
                r = await b.get(cb)
                if r.status != 302:
                    return f"{target!r}: callback {r.status}"
                loc = r.headers["Location"]
                final = urlsplit(urljoin(env.url + "/portvakt/callback", loc))
                if (
                    (final.scheme, final.netloc) != (origin.scheme, origin.netloc)
                    or not loc.startswith("/")
                    or loc.startswith("//")
                    or "\\" in loc
                ):
                    return f"{target!r} -> {loc!r}"
                return None

        bad = [x for x in await asyncio.gather(*(one(t) for t in lines)) if x]
        assert not bad, bad[:10]
    finally:
        await b.close()


async def test_frontchannel_during_a_redis_hang_is_accepted_and_done_when_it_is_back(
    persons_env, redis_server
):
    env = await persons_env(store={"backend": "redis", "url": redis_server.url, "timeout_seconds": 0.5})
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        sso = next(iter(env.op.sessions.values()))
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
                async with raw.get(
                    env.url + "/portvakt/logout/frontchannel", params={"iss": env.op.issuer, "sid": sso.sid}
                ) as r:
                    assert r.status == 202 and r.headers["Cache-Control"] == "no-store"
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        ev = await env.events("logout_frontchannel", timeout=15)
        assert ev and ev[-1]["retried"] is True
        r = await b.get(env.url + "/app/")
        assert r.status == 302 and "/portvakt/login" in r.headers["Location"]
    finally:
        await b.close()


async def test_refresh_never_downgrades_the_level(persons_env):
    env = await persons_env(op_kwargs={"access_ttl": 3}, refresh_leeway_seconds=2)
    b = HttpBrowser(env.gw)
    try:
        await b.login("/app/high/x", acr="idporten-loa-high")
        env.op.force_acr = "idporten-loa-substantial"  # the refreshed id_token says less
        await asyncio.sleep(1.5)
        status, _, doc = await _json(b, env.url + "/app/high/x")
        assert status == 200 and doc["headers"]["X-Portvakt-Acr"] == "idporten-loa-high"
        assert env.op.grants["refresh_token"] >= 1
    finally:
        await b.close()
