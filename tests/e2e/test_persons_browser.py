"""Persons' login in a real browser: headless Chromium (Playwright) against the gateway and the
ID-porten-faithful dev provider. Acceptance tests of research/persons-login.md §c."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs

from tests.fixtures.persons import block_third_party_cookies, dev_login


def _echo(text: str) -> dict:
    return json.loads(text)


async def _body_json(page) -> dict:
    return json.loads(await page.inner_text("body"))


async def test_login_lands_on_target_and_upstream_sees_person(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    await page.goto(env.url + "/app/inbox?x=1&y=%C3%A5")
    assert page.url.startswith(env.op.login_base + "/authorize"), page.url
    await dev_login(page, acr="idporten-loa-substantial")
    await page.wait_for_url(env.url + "/app/inbox?x=1&y=%C3%A5")
    doc = await _body_json(page)
    h = doc["headers"]
    assert doc["path"] == "/app/inbox" and doc["query"] == "x=1&y=å"  # the echo shows it decoded
    assert h["X-Portvakt-Acr"] == "idporten-loa-substantial"
    assert h["X-Portvakt-Person"] == "24917397852"
    assert h["X-Portvakt-Amr"] == "TestID"
    assert h["Authorization"].startswith("Bearer ey")
    assert "X-Portvakt-Session" in h and "X-Portvakt-Auth-Time" in h
    assert "portvakt" not in h.get("Cookie", "").lower()
    # The signed assertion carries acr, amr, auth_time, the hashed session (pid protected as today).
    claims = json.loads(base64.urlsafe_b64decode(h["X-Portvakt-Assertion"].split(".")[1] + "=="))
    assert claims["acr"] == "idporten-loa-substantial" and claims["session"] == h["X-Portvakt-Session"]
    assert claims["pid"] == "24917397852" and claims["amr"] == "TestID"
    # PAR was used: /authorize saw only client_id + request_uri; PKCE S256, fresh state/nonce.
    assert env.op.par_requests and env.op.par_requests[0]["code_challenge_method"] == "S256"
    par = env.op.par_requests[0]
    assert len(par["code_challenge"]) == 43 and "=" not in par["code_challenge"]
    assert (
        len(par["state"]) >= 22
        and len(par["nonce"]) >= 22
        and par["acr_values"] == "idporten-loa-substantial"
    )
    # Session cookie: __Host-, Secure, HttpOnly, Lax, Path=/, no Domain; small; no JWT inside.
    cookies = {c["name"]: c for c in await ctx.cookies(env.url)}
    c = cookies["__Host-portvakt-session"]
    assert c["secure"] and c["httpOnly"] and c["sameSite"] == "Lax" and c["path"] == "/"
    assert len(c["value"]) < 4096 and "eyJ" not in c["value"]
    # The session endpoint reports times and level, never tokens.
    await page.goto(env.url + "/portvakt/session")
    s = await _body_json(page)
    assert s["acr"] == "idporten-loa-substantial" and s["session"]["active"] is True
    assert s["session"]["timeout_in_seconds"] > 0 and s["session"]["ends_in_seconds"] > 0
    assert "eyJ" not in json.dumps(s)
    ok = await env.events("login_success")
    assert len(ok) == 1 and ok[0]["acr"] == "idporten-loa-substantial" and "pseudonym" in ok[0]["person"]
    assert "24917397852" not in json.dumps(ok)


async def test_step_up_navigation_and_xhr(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    await page.goto(env.url + "/app/")
    await dev_login(page, acr="idporten-loa-substantial")
    await page.wait_for_url(env.url + "/app/")
    # XHR to the high route: 401 with the level named, JSON problem.
    r = await page.evaluate("""async () => { const r = await fetch('/app/high/data', {headers: {'Accept': 'application/json'}});
        return {status: r.status, www: r.headers.get('WWW-Authenticate'), body: await r.json()} }""")
    assert r["status"] == 401
    assert (
        'error="insufficient_user_authentication"' in r["www"]
        and 'acr_values="idporten-loa-high"' in r["www"]
    )
    assert r["body"]["reason"] == "step_up_required"
    # Navigation: to the OP with acr_values=high; after login at high, back on the route.
    await page.goto(env.url + "/app/high/doc")
    assert env.op.par_requests[-1]["acr_values"] == "idporten-loa-high"
    await dev_login(page, acr="idporten-loa-high")
    await page.wait_for_url(env.url + "/app/high/doc")
    assert (await _body_json(page))["headers"]["X-Portvakt-Acr"] == "idporten-loa-high"
    # The substantial route still works with the stepped-up session.
    await page.goto(env.url + "/app/")
    assert (await _body_json(page))["headers"]["X-Portvakt-Acr"] == "idporten-loa-high"
    assert len(await env.events("step_up")) == 1


async def test_rp_logout_then_login_required_and_client_b_gone(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    await block_third_party_cookies(ctx, page)
    await page.goto(env.op.login_base + "/clientb/login")
    await dev_login(page)
    await page.wait_for_selector("#clientb")
    assert "logged in" in await page.inner_text("#clientb")
    # SSO: Portvakt logs in without the login page.
    logins = env.op.logins
    await page.goto(env.url + "/app/")
    await page.wait_for_url(env.url + "/app/")
    assert env.op.logins == logins
    # Logout: POST form to end_session (id_token_hint, post_logout_redirect_uri, state), then back.
    posted = []
    page.on(
        "request",
        lambda req: posted.append(req) if req.url.startswith(env.op.login_base + "/logout") else None,
    )
    await page.goto(env.url + "/portvakt/logout")
    await page.click("#logout-confirm")
    await page.wait_for_url(env.url + "/")
    assert posted and posted[0].method == "POST"
    form = parse_qs(posted[0].post_data)
    assert set(form) >= {"id_token_hint", "post_logout_redirect_uri", "state", "client_id"}
    # Client B got its front-channel call; Portvakt got its own (self-notification, idempotent).
    assert any(c.get("sid") for c in env.op.frontchannel_calls)
    await page.goto(env.op.login_base + "/clientb/")
    assert "not logged in" in await page.inner_text("#clientb")
    await page.goto(env.url + "/app/")
    assert page.url.startswith(env.op.login_base + "/authorize")
    assert len(await env.events("logout_rp")) == 1
    await env.settle()
    assert len([e for e in env.audit() if e.get("type") == "logout_frontchannel"]) <= 1


async def test_frontchannel_logout_from_client_b_with_third_party_cookies_blocked(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    await block_third_party_cookies(ctx, page)
    await page.goto(env.url + "/app/")
    await dev_login(page)
    await page.wait_for_url(env.url + "/app/")
    await page.goto(env.op.login_base + "/clientb/login")
    await page.wait_for_selector("#clientb")
    # Logging out at client B: the OP's page frames Portvakt's front-channel URI (cross-site).
    await page.goto(env.op.login_base + "/clientb/logout")
    await page.wait_for_url(env.op.login_base + "/clientb/?state=b-state")
    ev = await env.events("logout_frontchannel")
    assert len(ev) == 1 and ev[0]["cookie_seen"] is False and ev[0]["sessions"]
    await page.goto(env.url + "/app/")
    assert page.url.startswith(env.op.login_base + "/authorize")


async def test_three_tabs_log_in_at_once_and_finish_in_order_2_1_3(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    pages = [await ctx.new_page() for _ in range(3)]
    targets = ["/app/one", "/app/two?t=2", "/app/three"]
    for p, t in zip(pages, targets):
        await p.goto(env.url + t)
        await p.wait_for_selector("#login")
    statuses = []
    for i in (1, 0, 2):
        await pages[i].click("#login")
        await pages[i].wait_for_url(env.url + targets[i])
        statuses.append((await _body_json(pages[i]))["path"])
    assert statuses == ["/app/two", "/app/one", "/app/three"]
    # One browser, one cookie: the last login's session; earlier ones were ended (at most one).
    cookies = [c for c in await ctx.cookies(env.url) if c["name"] == "__Host-portvakt-session"]
    assert len(cookies) == 1
    for p, t in zip(pages, targets):
        await p.reload()
        assert p.url == env.url + t and (await _body_json(p))["headers"]["X-Portvakt-Person"] == "24917397852"
    await env.settle()
    assert not [e for e in env.audit() if e.get("type") == "login_failure"]


async def test_logout_callback_with_a_wrong_state_lands_home_quietly(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    r = await page.goto(env.url + "/portvakt/logout/callback?state=forged")
    assert page.url == env.url + "/" and r.status == 200


async def test_error_from_the_provider_shows_a_page_with_try_again(persons_env, chromium):
    env = await persons_env()
    ctx = await chromium()
    page = await ctx.new_page()
    await page.goto(env.url + "/app/")
    await page.click("#cancel")
    await page.wait_for_url(env.url + "/portvakt/callback**")
    assert await page.locator("#retry").count() == 1
    assert "access_denied" not in await page.content()
    ev = await env.events("login_failure")
    assert ev[-1]["reason"] == "provider_error:access_denied"
