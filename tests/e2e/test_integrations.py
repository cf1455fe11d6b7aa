"""Fiks integrations end to end: real gateway process, real TLS (and client certs), real token
issuer, real upstream. argon2 runs are counted on the gateway's metrics endpoint."""

from __future__ import annotations

import asyncio

from tests.e2e.helpers_identity import (
    FAST,
    GRANTING_ORG,
    ORG_URL,
    OTHER_ORG,
    PASSWORD,
    UNKNOWN_ID,
    bearer,
    call,
    creds,
    identity_config,
    integration_entry,
)

URL = ORG_URL.format(org=GRANTING_ORG)
ARGON2 = "portvakt_argon2_verifications_total"


async def test_right_credentials_pass_with_one_argon2_run_across_50_requests(start_gateway, upstream, issuer):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    token = issuer.mint(scope="ks:fiks")
    headers = {**bearer(token), **creds()}
    async with gw.session() as s:
        # Ten concurrent first requests share one verification; forty more hit the cache.
        first = await asyncio.gather(*(call(s, gw.url + URL, headers) for _ in range(10)))
        statuses = [status for status, _, _ in first]
        for _ in range(40):
            status, _, _ = await call(s, gw.url + URL, headers)
            statuses.append(status)
    assert statuses == [200] * 50
    assert len(upstream.requests) == 50
    # The password the gateway consumed never travels on to the upstream.
    for r in upstream.requests:
        assert not any(name.lower() == "integrasjonpassord" for name in r["headers"])
    assert await gw.metric(ARGON2, {"result": "match"}) == 1
    assert await gw.metric(ARGON2, {"result": "mismatch"}) == 0
    assert await gw.metric("portvakt_integration_credential_cache_total", {"result": "miss"}) == 1


async def test_every_failure_is_one_identical_401_and_nothing_reaches_upstream(
    start_gateway, upstream, issuer, pki
):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    good = issuer.mint(scope="ks:fiks")
    cases = {
        "integration_unknown": (None, {**bearer(good), **creds(UNKNOWN_ID)}),
        "integration_bad_password": (None, {**bearer(good), **creds(password="feil-passord")}),
        "integration_org_mismatch": (
            None,
            {**bearer(issuer.mint(org=OTHER_ORG, scope="ks:fiks")), **creds()},
        ),
        "integration_token_missing": (None, creds()),
    }
    bodies = {}
    for internal, (cert, headers) in cases.items():
        async with gw.session(*(cert or (None, None))) as s:
            status, body, resp_headers = await call(s, gw.url + URL, headers)
        assert status == 401, (internal, body)
        assert resp_headers["WWW-Authenticate"] == 'IntegrasjonPassord realm="portvakt"'
        assert body.pop("request_id") == resp_headers["X-Request-Id"]
        bodies[internal] = body
        filt = {"filter": "integrations", "decision": "deny", "reason": internal}
        assert await gw.metric("portvakt_filter_decisions_total", filt) == 1, internal
    first = next(iter(bodies.values()))
    assert first["reason"] == "integration_auth_failed"
    assert all(b == first for b in bodies.values()), bodies
    assert upstream.started == 0
    # The SEID 1 client certificate belongs to 958935420, not the token's (and the integration's)
    # 991825827: the token binding refuses it before the integration is looked at.
    async with gw.session(pki.client_seid1_cert, pki.client_seid1_key) as s:
        status, body, resp_headers = await call(s, gw.url + URL, {**bearer(good), **creds()})
    assert status == 401 and body["reason"] == "invalid_token"
    assert upstream.started == 0
    # The precise reason is in the access log, never the password.
    await asyncio.sleep(0.2)
    logged = {line.get("reason") for line in gw.access_log()}
    assert set(cases) | {"token_certificate_org_mismatch"} <= logged
    assert PASSWORD not in gw.output() and "feil-passord" not in gw.output()


async def test_right_certificate_and_required_certificate(start_gateway, upstream, issuer, pki):
    cfg = identity_config(upstream.url, issuer, integrations=[integration_entry(require_certificate=True)])
    gw = await start_gateway(cfg)
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}
    async with gw.session() as s:  # no client certificate
        status, body, _ = await call(s, gw.url + URL, headers)
    assert status == 401
    assert (
        await gw.metric(
            "portvakt_filter_decisions_total",
            {"filter": "integrations", "decision": "deny", "reason": "integration_cert_required"},
        )
        == 1
    )
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:  # org 991825827
        status, body, _ = await call(s, gw.url + URL, headers)
    assert status == 200, body


async def test_brute_force_backoff_engages_and_releases(start_gateway, upstream, issuer):
    policy = {
        "brute_force": {"free_failures": 2, "max_failures": 3, "lockout_seconds": 1.5, "decay_seconds": 600}
    }
    gw = await start_gateway(identity_config(upstream.url, issuer, integrations_policy=policy))
    token = issuer.mint(scope="ks:fiks")
    async with gw.session() as s:
        for i in range(3):
            status, body, _ = await call(s, gw.url + URL, {**bearer(token), **creds(password=f"gjett-{i}")})
            assert (status, body["reason"]) == (401, "integration_auth_failed")
        # Locked: refused before any check, even with the right password.
        for password in ("gjett-3", PASSWORD):
            status, body, headers = await call(s, gw.url + URL, {**bearer(token), **creds(password=password)})
            assert (status, body["reason"]) == (429, "too_many_failed_attempts")
            assert 1 <= int(headers["Retry-After"]) <= 2
        runs = await gw.metric(ARGON2, {"result": "mismatch"})
        assert runs == 3  # the refused attempts never reached argon2
        # The lockout releases after its period.
        await asyncio.sleep(1.6)
        status, body, _ = await call(s, gw.url + URL, {**bearer(token), **creds()})
        assert status == 200, body
    assert await gw.metric("portvakt_integration_lockouts_total", {"scope": "pair"}) == 1
    assert len(upstream.requests) == 1


async def test_changed_password_hash_takes_effect_on_reload(start_gateway, upstream, issuer):
    cfg = identity_config(upstream.url, issuer)
    gw = await start_gateway(cfg)
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}
    async with gw.session() as s:
        assert (await call(s, gw.url + URL, headers))[0] == 200
        new = integration_entry(password_hash=FAST.hash("nytt-passord"))
        gw.write_config(identity_config(upstream.url, issuer, integrations=[new]))
        assert await gw.reload() == "success"
        status, body, _ = await call(s, gw.url + URL, headers)
        assert (status, body["reason"]) == (401, "integration_auth_failed")
        status, _, _ = await call(s, gw.url + URL, {**headers, **creds(password="nytt-passord")})
        assert status == 200


async def test_demo_config_integration_grant_and_route(start_gateway, upstream, issuer):
    """config/demo.yaml's integration (password `demo-passord`, default argon2 cost), grant and
    innsyn route, served against the test issuer: the README's example call shape."""
    from pathlib import Path

    import yaml

    from tests.fixtures.gateway import basic_config

    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "demo.yaml").read_text())
    route = next(r for r in demo["routes"] if r["name"] == "innsyn")
    cfg = basic_config(
        upstream.url, issuers=issuer.issuers_config(), integrations=demo["integrations"], routes=[route]
    )
    gw = await start_gateway(cfg)
    iid = demo["integrations"][0]["id"]
    headers = {
        **bearer(issuer.mint()),
        **creds(iid, "demo-passord"),
    }  # dev-token defaults: org 991825827, ks:fiks
    async with gw.session() as s:
        status, body, _ = await call(s, gw.url + URL, headers)
        assert status == 200, body
        status, body, _ = await call(s, gw.url + ORG_URL.format(org=OTHER_ORG), headers)
        assert (status, body["reason"]) == (403, "missing_privilege")
