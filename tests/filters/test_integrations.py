"""filters/integrations/stage.py on hand-built contexts: the headers, org and certificate binding,
the one generic 401 for every failure, detect and off modes."""

from __future__ import annotations

import logging

import pytest

from filters import integrations as mod
from gateway.chain import ALLOW, SKIP, Deny, Mode, run_chain
from tests.filters.helpers_identity import (
    INTEGRATION_ID,
    OTHER_ID,
    OTHER_ORG,
    OWNER_ORG,
    PASSWORD,
    UNKNOWN_ID,
    certificate,
    creds,
    ctx,
    env,
    integration,
    make_config,
    maskinporten,
)
from tests.filters.helpers_integrations import body_without_id, build

# --- the happy path and header handling ------------------------------------------------------


async def test_no_headers_skips():
    _, flt = build()
    c = ctx({}, token=maskinporten())
    assert await flt.check(c) is SKIP
    assert c.integration is None and c.integration_id_claimed is None


async def test_right_credentials_allow_and_bind_identity():
    _, flt = build()
    c = ctx(creds(INTEGRATION_ID.upper()), token=maskinporten())
    assert await flt.check(c) is ALLOW
    assert c.integration is not None
    assert (c.integration.id, c.integration.authorized_org) == (INTEGRATION_ID, OWNER_ORG)
    assert c.integration_id_claimed == INTEGRATION_ID
    assert c.audit["integrations"] == {"id": INTEGRATION_ID, "result": "ok", "authorized_org": OWNER_ORG}


@pytest.mark.parametrize(
    "id_name,pw_name", [("integrasjonId", "integrasjonPassord"), ("INTEGRASJONID", "integrasjonpassord")]
)
async def test_header_names_are_case_insensitive(id_name, pw_name):
    _, flt = build()
    c = ctx({id_name: INTEGRATION_ID, pw_name: PASSWORD}, token=maskinporten())
    assert await flt.check(c) is ALLOW


async def test_matching_certificate_is_accepted():
    _, flt = build()
    assert await flt.check(ctx(creds(), token=maskinporten(), cert=certificate(OWNER_ORG))) is ALLOW


@pytest.mark.parametrize(
    "headers,internal,claimed",
    [
        ({"IntegrasjonId": INTEGRATION_ID}, "integration_credentials_incomplete", INTEGRATION_ID),
        ({"IntegrasjonPassord": PASSWORD}, "integration_credentials_incomplete", None),
        (
            [
                ("IntegrasjonId", INTEGRATION_ID),
                ("IntegrasjonId", OTHER_ID),
                ("IntegrasjonPassord", PASSWORD),
            ],
            "integration_credentials_incomplete",
            None,
        ),
        ({"IntegrasjonId": "not-a-uuid", "IntegrasjonPassord": PASSWORD}, "integration_id_malformed", None),
        (
            {"IntegrasjonId": "{" + INTEGRATION_ID + "}", "IntegrasjonPassord": PASSWORD},
            "integration_id_malformed",
            None,
        ),
    ],
)
async def test_incomplete_or_malformed_credentials_are_401(headers, internal, claimed):
    stage, flt = build()
    c = ctx(headers, token=maskinporten())
    d = await flt.check(c)
    assert isinstance(d, Deny) and d.problem.status == 401
    assert d.problem.reason == "integration_auth_failed" and d.problem.internal_reason == internal
    assert d.problem.headers["WWW-Authenticate"].startswith("IntegrasjonPassord")
    assert c.integration_id_claimed == claimed
    assert stage.verifier.hasher.calls == 0  # nothing to verify: no argon2


# --- identical failures ----------------------------------------------------------------------


FAILURES = [
    ("unknown id", dict(headers=creds(UNKNOWN_ID)), "integration_unknown"),
    ("wrong password", dict(headers=creds(password="feil")), "integration_bad_password"),
    ("empty password", dict(headers=creds(password="")), "integration_bad_password"),
    ("undecodable password", dict(headers=creds(password="\udcff\udcfe")), "integration_bad_password"),
    ("overlong password", dict(headers=creds(password="x" * 1025)), "integration_bad_password"),
    ("org mismatch", dict(headers=creds(), token=maskinporten(OTHER_ORG)), "integration_org_mismatch"),
    ("cert mismatch", dict(headers=creds(), cert=certificate(OTHER_ORG)), "integration_cert_mismatch"),
    ("cert without org", dict(headers=creds(), cert=certificate(None)), "integration_cert_mismatch"),
    ("no token", dict(headers=creds(), token=None), "integration_token_missing"),
]


@pytest.mark.parametrize("name,kw,internal", FAILURES, ids=[f[0] for f in FAILURES])
async def test_every_failure_is_the_same_generic_401(name, kw, internal):
    _, flt = build()
    kw = dict(kw)
    token = kw.pop("token", maskinporten())
    c = ctx(kw.pop("headers"), token=token, **kw)
    d = await flt.check(c)
    assert isinstance(d, Deny)
    assert d.problem.internal_reason == internal
    assert c.audit["integrations"]["reason"] == internal and c.audit["integrations"]["result"] == "denied"
    assert c.integration is None
    reference = await build()[1].check(ctx(creds(UNKNOWN_ID), token=maskinporten()))
    assert body_without_id(d) == body_without_id(reference)
    assert d.problem.headers == reference.problem.headers
    assert d.problem.status == 401 and body_without_id(d)["reason"] == "integration_auth_failed"


async def test_required_certificate_missing_is_the_same_401():
    _, flt = build(make_config([integration(require_certificate=True)]))
    d = await flt.check(ctx(creds(), token=maskinporten()))
    assert isinstance(d, Deny) and d.problem.internal_reason == "integration_cert_required"
    assert await flt.check(ctx(creds(), token=maskinporten(), cert=certificate(OWNER_ORG))) is ALLOW


async def test_password_never_reaches_audit_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    _, flt = build()
    for pw in (PASSWORD, "hemmelig-feil"):
        c = ctx(creds(password=pw), token=maskinporten())
        d = await flt.check(c)
        assert pw not in repr(c.audit)
        assert (d is ALLOW) == (pw == PASSWORD)
        if isinstance(d, Deny):
            assert pw.encode() not in d.problem.body("x") and pw not in repr(d.problem)
    assert "hemmelig-feil" not in caplog.text and PASSWORD not in caplog.text


async def test_detect_mode_records_and_lets_on():
    stage, flt = build(make_config(integrations_policy={"mode": "detect"}))
    assert flt.mode is Mode.detect
    c = ctx(creds(password="feil"), token=maskinporten())
    assert await run_chain((flt,), c) is None
    assert [(d.filter, d.reason) for d in c.detections] == [("integrations", "integration_bad_password")]
    assert c.integration is None


async def test_off_mode_and_public_routes_build_no_filter():
    cfg = make_config(integrations_policy={"mode": "off"})
    assert mod.build_stage(env(cfg)).filters_for_route(cfg.routes[0]) == []
    cfg = make_config(routes=[{"name": "open", "upstream": "u"}])
    assert mod.build_stage(env(cfg)).filters_for_route(cfg.routes[0]) == []
