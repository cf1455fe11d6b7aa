"""Front-channel logout by iss+sid without cookies, its headers, idempotence; revocation on logout
when scopes go beyond openid profile; the audit chain with the login events verifies."""

from __future__ import annotations

import subprocess
import sys

import aiohttp

from tests.fixtures.persons_http import HttpBrowser


async def test_frontchannel_wrong_iss_or_unknown_sid_deletes_nothing_and_is_idempotent(persons_env):
    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        sso = next(iter(env.op.sessions.values()))
        async with env.gw.session(cookie_jar=aiohttp.DummyCookieJar()) as raw:
            fc = env.url + "/portvakt/logout/frontchannel"
            for q in (
                {"iss": "https://evil.example", "sid": sso.sid},
                {"iss": env.op.issuer, "sid": "unknown"},
                {"sid": sso.sid},
                {},
            ):
                async with raw.get(fc, params=q) as r:
                    assert r.status == 200
                    assert r.headers["Cache-Control"] == "no-store"
                    assert f"frame-ancestors {env.op.login_base}" in r.headers["Content-Security-Policy"]
            async with b.session.get(env.url + "/app/", allow_redirects=False) as r:
                assert r.status == 200  # still logged in
            for _ in range(2):  # the right iss+sid, twice: one logout, one audit record
                async with raw.get(fc, params={"iss": env.op.issuer, "sid": sso.sid}) as r:
                    assert r.status == 200
        r = await b.get(env.url + "/app/")
        assert r.status == 302 and "/portvakt/login" in r.headers["Location"]
        await env.settle()
        assert len([e for e in env.audit() if e.get("type") == "logout_frontchannel"]) == 1
    finally:
        await b.close()


async def test_logout_revokes_when_scopes_go_beyond_openid_profile(persons_env):
    env = await persons_env(provider={"scopes": ["openid", "profile", "ks:fiks"]})
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        r = await b.logout()
        assert r.status == 200 and "id_token_hint" in await r.text()
        assert env.op.revocations == ["refresh_token"]
        ev = await env.events("logout_rp")
        assert ev[-1]["revoked"] is True
    finally:
        await b.close()
    env2 = await persons_env()
    b = HttpBrowser(env2.gw)
    try:
        await b.login()
        await b.logout()
        assert env2.op.revocations == []
    finally:
        await b.close()


async def test_audit_chain_with_login_events_verifies(persons_env):
    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        await b.login()
        await b.logout()
    finally:
        await b.close()
    await env.events("logout_rp")
    await env.settle()
    env.gw.stop()
    files = sorted(str(p) for p in env.audit_path.parent.glob("audit*.jsonl"))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", *files],
        capture_output=True,
        text=True,
        env={"PORTVAKT_AUDIT_KEY": "test-audit-key-0123456789", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = "".join(open(f).read() for f in files)
    assert "24917397852" not in text and "eyJ" not in text


async def test_forward_auth_endpoint(persons_env):
    env = await persons_env()
    b = HttpBrowser(env.gw)
    try:
        async with b.session.get(env.url + "/portvakt/auth") as r:
            assert r.status == 401
        await b.login()
        async with b.session.get(env.url + "/portvakt/auth?level=idporten-loa-substantial") as r:
            assert r.status == 204 and r.headers["X-Portvakt-Acr"] == "idporten-loa-substantial"
            assert "X-Portvakt-Person" not in r.headers and "Authorization" not in r.headers
        async with b.session.get(env.url + "/portvakt/auth?level=Level4") as r:
            assert r.status == 403 and 'acr_values="idporten-loa-high"' in r.headers["WWW-Authenticate"]
        async with b.session.get(env.url + "/portvakt/auth?level=bogus") as r:
            assert r.status == 400
    finally:
        await b.close()
