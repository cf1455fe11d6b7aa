"""Attacks on persons' login, over real sockets against the gateway and the dev provider: every
bad callback gets no session and exactly one ``login_failure`` audit record; session fixation,
CSRF on the callback, cookie tossing, two tabs' states mixed, a tampered cookie."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fixtures.persons_http import HttpBrowser, query

SESSION = "__Host-portvakt-session"


async def _failures(env) -> int:
    await env.settle()
    return len([r for r in env.audit() if r.get("type") == "login_failure"])


async def _assert_rejected(env, b: HttpBrowser, callback_url: str, reason: str, before: int) -> None:
    r = await b.get(callback_url)
    assert r.status in (400, 502), r.status
    assert SESSION not in {c.key for c in b.jar} or not b.cookie(SESSION)
    assert "set-cookie" not in {k.lower() for k in r.headers if "portvakt-session" in r.headers.get(k, "")}
    body = await r.text()
    assert reason not in body  # the reason goes to the audit, not to the client
    await env.settle()
    fails = [x for x in env.audit() if x.get("type") == "login_failure"]
    assert len(fails) == before + 1, fails
    assert fails[-1]["reason"].startswith(reason), fails[-1]
    # Still no session: the app sends the browser to login.
    r = await b.get(b.gw.url + "/app/")
    assert r.status == 302 and "/portvakt/login" in r.headers["Location"]


def _hook(mutate):
    def hook(claims, header):
        key, alg = None, "RS256"
        out = mutate(claims, header)
        if out is not None:
            key, alg = out
        return claims, header, key, alg

    return hook


@pytest.fixture
async def env(persons_env):
    return await persons_env()


async def _with_key(env, mutate):
    """id_token_hook that keeps the OP's key unless ``mutate`` returns (key, alg)."""

    def hook(claims, header):
        out = mutate(claims, header)
        key, alg = (env.op.key, "RS256") if out is None else out
        return claims, header, key, alg

    env.op.id_token_hook = hook


@pytest.mark.parametrize(
    "case,reason",
    [
        ("wrong_nonce", "id_token_wrong_nonce"),
        ("foreign_aud", "id_token_wrong_audience"),
        ("extra_aud", "id_token_untrusted_audience"),
        ("expired", "id_token_expired"),
        ("alg_none", "id_token_alg_not_allowed"),
        ("alg_hs256", "id_token_alg_not_allowed"),
        ("unknown_kid", "id_token_unknown_kid"),
        ("forged_signature", "id_token_bad_signature"),
        ("missing_sid", "id_token_missing_sid"),
        ("wrong_iss_claim", "id_token_wrong_issuer"),
    ],
)
async def test_bad_id_tokens_get_no_session_and_one_audit_record(env, case, reason):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def mutate(c, h):
        if case == "wrong_nonce":
            c["nonce"] = "not-the-nonce"
        elif case == "foreign_aud":
            c["aud"] = "someone-else"
        elif case == "extra_aud":
            c["aud"] = ["portvakt", "someone-else"]
        elif case == "expired":
            c["iat"], c["exp"] = int(time.time()) - 600, int(time.time()) - 300
        elif case == "alg_none":
            return None, "none"
        elif case == "alg_hs256":
            return b"portvakt-public-knowledge-secret-0123456789", "HS256"
        elif case == "unknown_kid":
            h["kid"] = "kid-nobody-published"
            return other, "RS256"
        elif case == "forged_signature":
            return other, "RS256"  # the published kid, another key
        elif case == "missing_sid":
            c.pop("sid", None)
        elif case == "wrong_iss_claim":
            c["iss"] = "https://idporten.evil.example"
        return None

    await _with_key(env, mutate)
    b = HttpBrowser(env.gw)
    try:
        before = await _failures(env)
        cb = await b.authorize(await b.start_login())
        await _assert_rejected(env, b, cb, reason, before)
    finally:
        await b.close()


async def test_acr_below_the_request_is_refused(env):
    env.op.force_acr = "idporten-loa-substantial"  # the OP claims less than was asked for
    b = HttpBrowser(env.gw)
    try:
        before = await _failures(env)
        cb = await b.authorize(await b.start_login("/app/high/x"), acr="idporten-loa-high")
        await _assert_rejected(env, b, cb, "acr_too_low", before)
    finally:
        await b.close()


@pytest.mark.parametrize(
    "case,reason",
    [
        ("wrong_state", "callback_state_unknown"),
        ("missing_iss", "callback_iss_missing"),
        ("wrong_iss", "callback_wrong_iss"),
        ("op_error", "provider_error:access_denied"),
    ],
)
async def test_bad_callbacks(env, case, reason):
    if case == "missing_iss":
        env.op.omit_iss = True
    if case == "wrong_iss":
        env.op.wrong_iss = "https://mix-up.example"
    b = HttpBrowser(env.gw)
    try:
        before = await _failures(env)
        cb = await b.authorize(await b.start_login(), action="cancel" if case == "op_error" else "login")
        if case == "wrong_state":
            q = query(cb)
            cb = cb.replace(q["state"], q["state"][:-2] + ("AA" if not q["state"].endswith("AA") else "BB"))
        await _assert_rejected(env, b, cb, reason, before)
    finally:
        await b.close()


async def test_replayed_code_and_replayed_callback(env):
    b = HttpBrowser(env.gw)
    try:
        cb = await b.authorize(await b.start_login())
        r = await b.get(cb)
        assert r.status == 302 and r.headers["Location"] == "/app/"
        b.jar.clear()
        before = await _failures(env)
        # The same callback again: its state was single-use.
        await _assert_rejected(env, b, cb, "callback_state_unknown", before)
        # The old code under a fresh attempt's state: the OP refuses the used code.
        cb2 = await b.authorize(await b.start_login())  # SSO: a new code at once
        q_old, q_new = query(cb), query(cb2)
        forged = cb2.replace(q_new["code"], q_old["code"])
        await _assert_rejected(env, b, forged, "token_refused:invalid_grant", before + 1)
    finally:
        await b.close()


async def test_csrf_on_callback_another_browser_gets_no_session(env):
    attacker, victim = HttpBrowser(env.gw), HttpBrowser(env.gw)
    try:
        # The attacker starts a login, logs in as themself, and sends the victim the callback URL.
        cb = await attacker.authorize(await attacker.start_login(), pid="01010112345")
        before = await _failures(env)
        await _assert_rejected(env, victim, cb, "callback_browser_mismatch", before)
    finally:
        await attacker.close()
        await victim.close()


async def test_two_tabs_states_mixed_get_no_session(env):
    b = HttpBrowser(env.gw)
    try:
        tab1 = await b.start_login("/app/one")
        tab2 = await b.start_login("/app/two")
        cb1 = await b.authorize(tab1)
        cb2 = await b.authorize(tab2)
        q1, q2 = query(cb1), query(cb2)
        # Tab 2's code under tab 1's state: tab 1's PKCE verifier does not fit tab 2's code.
        mixed = cb1.replace(q1["code"], q2["code"])
        before = await _failures(env)
        await _assert_rejected(env, b, mixed, "token_refused:invalid_grant", before)
    finally:
        await b.close()


async def test_session_fixation_planted_cookie_is_replaced(env):
    attacker, victim = HttpBrowser(env.gw), HttpBrowser(env.gw)
    try:
        r = await attacker.login(pid="01010112345")
        assert r.status == 302
        planted = attacker.cookie(SESSION)
        assert planted
        from yarl import URL

        victim.jar.update_cookies({SESSION: planted}, URL(env.url))
        r = await victim.get(env.url + "/portvakt/login?redirect=/app/")
        assert r.status == 302
        r = await victim.get(await victim.authorize(r.headers["Location"]))
        assert r.status == 302 and r.headers["Location"] == "/app/"
        assert victim.cookie(SESSION) != planted
        r = await victim.get(env.url + "/app/", headers={"Accept": "application/json"})
        # The planted (attacker's) session was ended by the victim's login: the attacker is out.
        r = await attacker.get(env.url + "/app/")
        assert r.status == 302 and "/portvakt/login" in r.headers["Location"]
        async with victim.session.get(env.url + "/app/") as r:
            doc = await r.json()
        assert doc["headers"]["X-Portvakt-Person"] == "24917397852"
    finally:
        await attacker.close()
        await victim.close()


async def test_cookie_tossing_and_tampering_give_login_not_error(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        good = b.cookie(SESSION)
        async with b.session.get(env.url + "/app/", allow_redirects=False) as r:
            assert r.status == 200
        # A second value of the session cookie (tossed from a sibling or a path): ambiguous -> no session.
        import aiohttp

        async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
            async with raw.get(
                env.url + "/app/", headers={"Cookie": f"{SESSION}={good}"}, allow_redirects=False
            ) as r:
                assert r.status == 200  # the same cookie, sent by hand, works
            for cookie in (
                f"{SESSION}={good}; {SESSION}=v1.k1.AAAA",
                f"{SESSION}={good[:-3]}{'A' if good[-3] != 'A' else 'B'}{good[-2:]}",
                f"{SESSION}=garbage",
                f"{SESSION}={good.replace('v1.k1.', 'v1.k9.')}",
            ):
                async with raw.get(
                    env.url + "/app/",
                    headers={"Cookie": cookie, "Accept": "text/html"},
                    allow_redirects=False,
                ) as r:
                    assert r.status == 302, (cookie, r.status)
                    assert "/portvakt/login" in r.headers["Location"]
        # Portvakt's cookies never reach the upstream, on person routes and on public ones.
        env.up.clear()
        async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
            async with raw.get(
                env.url + "/public", headers={"Cookie": f"{SESSION}={good}; app=1; __Host-portvakt-login=x"}
            ) as r:
                assert r.status == 200
        assert env.up.requests[-1]["headers"].get("Cookie") == "app=1"
    finally:
        await b.close()


async def test_authorization_header_on_session_route_is_refused(env):
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        async with b.session.get(env.url + "/app/", headers={"Authorization": "Bearer eyJhbGciOi.x.y"}) as r:
            assert r.status == 400
            assert (await r.json())["reason"] == "authorization_on_session_route"
    finally:
        await b.close()


async def test_hostile_inputs_to_the_login_endpoints_never_give_5xx(env):
    import aiohttp

    long = "A" * 6000
    cases = [
        ("GET", "/portvakt/callback?state=" + long + "&code=x"),
        ("GET", "/portvakt/callback?state=a&state=b&code=x"),
        ("GET", "/portvakt/callback?code=" + long),
        ("GET", "/portvakt/callback?state=%FF%FE&code=%00"),
        ("GET", "/portvakt/callback"),
        ("GET", "/portvakt/login?redirect=" + long),
        ("GET", "/portvakt/login?redirect=%0d%0aSet-Cookie:%20x=1&level=" + long + "&locale=" + long),
        ("GET", "/portvakt/logout/frontchannel?iss=" + long + "&sid=" + long),
        ("GET", "/portvakt/logout/callback?state=" + long),
        ("GET", "/portvakt/nothing-here"),
        ("POST", "/portvakt/login"),
        ("DELETE", "/portvakt/session"),
        ("GET", "/portvakt/../app/"),
        ("GET", "/portvakt/session"),
        ("POST", "/portvakt/session/refresh"),
    ]
    async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as s:
        for method, path in cases:
            hdrs = {"Cookie": "__Host-portvakt-session=" + "x" * 900 + "; __Host-portvakt-login=" + "y" * 43}
            async with s.request(method, env.url + path, headers=hdrs, allow_redirects=False) as r:
                body = await r.text()
                assert r.status < 500, (method, path[:80], r.status, body[:200])
                assert "Traceback" not in body
                for v in r.headers.getall("Set-Cookie", ()):
                    assert "x=1" not in v
                loc = r.headers.get("Location", "")
                assert "\r" not in loc and "\n" not in loc
