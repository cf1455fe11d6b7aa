"""Privileges and route policy end to end: grants (and their withdrawal by reload), persons with
acr and own pid, certificates, 401 vs 403 vs 400, over the real gateway process."""

from __future__ import annotations

import asyncio

from tests.e2e.helpers_identity import (
    GRANTING_ORG,
    ORG_URL,
    OTHER_ORG,
    OTHER_PERSON,
    PERSON,
    PERSON_URL,
    bearer,
    call,
    creds,
    identity_config,
    integration_entry,
)


async def test_grant_allows_missing_grant_denies_and_withdrawal_applies_on_reload(
    start_gateway, upstream, issuer
):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}
    async with gw.session() as s:
        status, body, _ = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), headers)
        assert status == 200, body
        status, body, _ = await call(s, gw.url + ORG_URL.format(org=OTHER_ORG), headers)
        assert (status, body["reason"]) == (403, "missing_privilege")
        assert len(upstream.requests) == 1

        # The granting organisation withdraws its grant: the next request after reload is refused.
        gw.write_config(identity_config(upstream.url, issuer, integrations=[integration_entry(grants=[])]))
        assert await gw.reload() == "success"
        status, body, _ = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), headers)
        assert (status, body["reason"]) == (403, "missing_privilege")
        assert len(upstream.requests) == 1

        # Granted again (for this service only): passes again.
        gw.write_config(identity_config(upstream.url, issuer))
        assert await gw.reload() == "success"
        status, _, _ = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), headers)
        assert status == 200
    await asyncio.sleep(0.2)
    assert "grant withdrawn: integration=" in gw.output()


async def test_integration_needs_the_routes_scope(start_gateway, upstream, issuer):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    headers = {**bearer(issuer.mint(scope="ks:annet")), **creds()}
    async with gw.session() as s:
        status, body, resp = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), headers)
    assert (status, body["reason"]) == (403, "insufficient_scope")
    assert 'error="insufficient_scope"' in resp["WWW-Authenticate"]
    assert upstream.started == 0


async def test_no_credentials_is_401_bearer_and_token_alone_is_403(start_gateway, upstream, issuer):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    async with gw.session() as s:
        status, body, resp = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG))
        assert (status, body["reason"]) == (401, "authentication_required")
        assert resp["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = await call(
            s, gw.url + ORG_URL.format(org=GRANTING_ORG), bearer(issuer.mint(scope="ks:fiks"))
        )
        assert (status, body["reason"]) == (403, "integration_required")
    assert upstream.started == 0


async def test_invalid_organisation_number_in_path_is_400(start_gateway, upstream, issuer):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}
    async with gw.session() as s:
        status, body, _ = await call(s, gw.url + ORG_URL.format(org="958935421"), headers)
    assert (status, body["reason"]) == (400, "invalid_organization_number")
    assert upstream.started == 0


async def test_persons_own_data_acr_and_other_persons(start_gateway, upstream, issuer):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    idp = issuer.idporten
    assert idp is not None
    high = bearer(idp.mint(pid=PERSON, acr="idporten-loa-high"))
    substantial = bearer(idp.mint(pid=PERSON, acr="idporten-loa-substantial"))
    async with gw.session() as s:
        status, body, _ = await call(s, gw.url + PERSON_URL.format(pid=PERSON), high)
        assert status == 200, body
        status, body, _ = await call(s, gw.url + PERSON_URL.format(pid=PERSON), substantial)
        assert (status, body["reason"]) == (403, "insufficient_acr")
        status, body, _ = await call(s, gw.url + PERSON_URL.format(pid=OTHER_PERSON), high)
        assert (status, body["reason"]) == (403, "not_own_data")
        bad_pid = PERSON[:-1] + str((int(PERSON[-1]) + 1) % 10)
        status, body, _ = await call(s, gw.url + PERSON_URL.format(pid=bad_pid), high)
        assert (status, body["reason"]) == (400, "invalid_national_identity_number")
        # A person is no integration: org paths are not theirs.
        status, body, _ = await call(s, gw.url + ORG_URL.format(org=GRANTING_ORG), high)
        assert status == 403
    assert [r["path"] for r in upstream.requests] == [PERSON_URL.format(pid=PERSON)]
    # No national identity number in the access log or the gateway's output.
    await asyncio.sleep(0.2)
    out = gw.output()
    assert PERSON not in out and OTHER_PERSON not in out


async def test_certificate_org_rule(start_gateway, upstream, issuer, pki):
    gw = await start_gateway(identity_config(upstream.url, issuer))
    url = gw.url + "/innsyn/api/v1/status"
    async with gw.session(pki.client_seid1_cert, pki.client_seid1_key) as s:  # 958935420: listed
        status, body, _ = await call(s, url)
        assert status == 200, body
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:  # 991825827: not listed
        status, body, _ = await call(s, url)
        assert (status, body["reason"]) == (403, "access_denied")
    assert len(upstream.requests) == 1
