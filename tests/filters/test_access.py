"""filters/access.py on hand-built contexts: target organisation, grants, persons, certificate
and organisation rules, 401 vs 403, reason selection, reload."""

from __future__ import annotations

import logging

import pytest

from filters import access as mod
from gateway.chain import ALLOW, Deny, Mode, run_chain
from gateway.config import ConfigError
from gateway.context import IntegrationIdentity
from tests.filters.helpers_identity import (
    GRANTING_ORG,
    INTEGRATION_ID,
    OTHER_ID,
    OTHER_ORG,
    OTHER_PERSON,
    OWNER_ORG,
    PERSON,
    certificate,
    ctx,
    env,
    idporten,
    integration,
    make_config,
    maskinporten,
)

ORG_PATH = "/innsyn/api/v1/orgs/{org}/saker"
PERSON_PATH = "/innsyn/api/v1/personer/{pid}/saker"
CERT_ORG = "974760673"  # == OTHER_ORG: the org admitted by certificate
NOT_ADMITTED_ORG = "123456785"

INNSYN = {
    "name": "innsyn",
    "upstream": "u",
    "match": {"path_prefix": "/innsyn/"},
    "service": "innsyn",
    "legal_basis": "offentleglova § 3",
    "organization_from": "path:/innsyn/api/v1/orgs/{organization}/",
    "access": {
        "any_of": [
            {"integration": True, "scopes": ["ks:fiks"]},
            {"person": True, "acr": "idporten-loa-high", "pid_from": "path:/innsyn/api/v1/personer/{pid}/"},
            {"certificate_orgs": [CERT_ORG]},
        ]
    },
}


def granted(services=("innsyn",), org=GRANTING_ORG):
    return integration(grants=[{"organization": org, "services": list(services)}])


def build(routes=None, integrations=None):
    cfg = make_config(
        integrations=integrations if integrations is not None else [granted()], routes=routes or [INNSYN]
    )
    stage = mod.build_stage(env(cfg))
    (flt,) = stage.filters_for_route(cfg.routes[0])
    return stage, flt


def verified(iid=INTEGRATION_ID, org=OWNER_ORG) -> IntegrationIdentity:
    return IntegrationIdentity(id=iid, authorized_org=org)


def integration_ctx(org=GRANTING_ORG, **kw):
    kw.setdefault("token", maskinporten())
    kw.setdefault("integ", verified())
    return ctx(path=kw.pop("path", ORG_PATH.format(org=org)), **kw)


def denied(d, status, reason, internal=None):
    assert isinstance(d, Deny), d
    assert (d.problem.status, d.problem.reason) == (status, reason)
    if internal is not None:
        assert d.problem.log_reason == internal
    return d


# --- credentials at all ----------------------------------------------------------------------


async def test_no_credentials_is_401_with_bearer_challenge():
    _, flt = build()
    c = ctx(path=ORG_PATH.format(org=GRANTING_ORG))
    d = denied(await flt.check(c), 401, "authentication_required")
    assert d.problem.headers["WWW-Authenticate"].startswith("Bearer")
    assert c.audit["authorize"]["result"] == "denied"


async def test_a_certificate_alone_is_no_credential_where_no_rule_uses_certificates():
    route = {**INNSYN, "access": {"any_of": [{"integration": True}]}}
    _, flt = build([route])
    denied(
        await flt.check(ctx(cert=certificate(CERT_ORG), path=ORG_PATH.format(org=GRANTING_ORG))),
        401,
        "authentication_required",
    )


# --- integrations and grants -----------------------------------------------------------------


async def test_integration_with_grant_is_allowed_and_audited():
    _, flt = build()
    c = integration_ctx()
    assert await flt.check(c) is ALLOW
    assert c.target_org == GRANTING_ORG
    assert c.audit["authorize"] == {
        "service": "innsyn",
        "legal_basis": "offentleglova § 3",
        "result": "allowed",
        "rule": 0,
        "kind": "integration",
        "target_org": GRANTING_ORG,
    }


async def test_org_path_without_trailing_segment_matches():
    _, flt = build()
    c = integration_ctx(path=f"/innsyn/api/v1/orgs/{GRANTING_ORG}")
    assert await flt.check(c) is ALLOW


@pytest.mark.parametrize(
    "case,kw,internal",
    [
        ("org never granted", dict(org=OTHER_ORG), "missing_privilege"),
        ("own org without a grant", dict(org=OWNER_ORG), "missing_privilege"),
        ("another integration", dict(integ=verified(OTHER_ID)), "missing_privilege"),
        ("no org in path", dict(path="/innsyn/api/v1/status"), "target_organization_missing"),
    ],
)
async def test_integration_without_grant_is_403_missing_privilege(case, kw, internal):
    _, flt = build()
    denied(await flt.check(integration_ctx(**kw)), 403, "missing_privilege", internal)


async def test_grant_for_another_service_does_not_count():
    _, flt = build(integrations=[granted(services=("svarut",))])
    denied(await flt.check(integration_ctx()), 403, "missing_privilege")


async def test_grant_removed_on_reload_stops_the_next_request(caplog):
    old, old_flt = build()
    assert await old_flt.check(integration_ctx()) is ALLOW
    new, new_flt = build(integrations=[integration()])  # same integration, grant withdrawn
    caplog.set_level(logging.INFO, logger="portvakt.grants")
    new.adopt(old)
    await new.start()  # the runtime starts: the change is logged
    denied(await new_flt.check(integration_ctx()), 403, "missing_privilege")
    assert (
        f"grant withdrawn: integration={INTEGRATION_ID} organization={GRANTING_ORG} service=innsyn"
        in caplog.text
    )
    # ...and granted again: the next request passes.
    again, again_flt = build()
    again.adopt(new)
    await again.start()
    assert await again_flt.check(integration_ctx()) is ALLOW
    assert "grant added" in caplog.text


async def test_a_reload_that_never_starts_logs_no_grant_change(caplog):
    old, _ = build()
    failed, _ = build(integrations=[integration()])  # would withdraw the grant
    caplog.set_level(logging.INFO, logger="portvakt.grants")
    failed.adopt(old)  # the reload's build or start fails after this: nothing changed
    assert "grant withdrawn" not in caplog.text


async def test_missing_scope_is_403_insufficient_scope():
    _, flt = build()
    d = denied(
        await flt.check(integration_ctx(token=maskinporten(scopes=("ks:annet",)))), 403, "insufficient_scope"
    )
    assert 'error="insufficient_scope"' in d.problem.headers["WWW-Authenticate"]
    assert 'scope="ks:fiks"' in d.problem.headers["WWW-Authenticate"]


async def test_maskinporten_token_without_integration_is_403_integration_required():
    _, flt = build()
    c = ctx(token=maskinporten(), path=ORG_PATH.format(org=GRANTING_ORG))
    denied(await flt.check(c), 403, "integration_required")


async def test_org_from_header():
    route = {**INNSYN, "organization_from": "header:FiksOrgId"}
    _, flt = build([route])
    c = integration_ctx(path="/innsyn/api/v1/saker", headers={"fiksorgid": f" {GRANTING_ORG} "})
    assert await flt.check(c) is ALLOW and c.target_org == GRANTING_ORG
    c = integration_ctx(
        path="/innsyn/api/v1/saker", headers=[("FiksOrgId", GRANTING_ORG), ("FiksOrgId", OTHER_ORG)]
    )
    denied(await flt.check(c), 400, "invalid_organization_number", "organization_header_repeated")
    c = integration_ctx(path="/innsyn/api/v1/saker", headers={"FiksOrgId": "958935421"})
    denied(await flt.check(c), 400, "invalid_organization_number")
    c = integration_ctx(path="/innsyn/api/v1/saker")
    denied(await flt.check(c), 403, "missing_privilege", "target_organization_missing")


@pytest.mark.parametrize("org", ["958935421", "95893542", "9589354200", "95893542x", "%39%35%38935420"])
async def test_invalid_org_in_path_is_400(org):
    _, flt = build()
    c = integration_ctx(path=f"/innsyn/api/v1/orgs/{org}/saker")
    denied(await flt.check(c), 400, "invalid_organization_number")
    assert c.target_org is None


# --- persons ---------------------------------------------------------------------------------


async def test_person_reaches_own_data_and_audit_has_no_pid():
    _, flt = build()
    c = ctx(token=idporten(PERSON), path=PERSON_PATH.format(pid=PERSON))
    assert await flt.check(c) is ALLOW
    assert c.target_pid == PERSON
    assert c.audit["authorize"]["own_pid"] is True and c.audit["authorize"]["kind"] == "person"
    assert PERSON not in repr(c.audit)


async def test_other_persons_pid_is_403_not_own_data():
    _, flt = build()
    c = ctx(token=idporten(PERSON), path=PERSON_PATH.format(pid=OTHER_PERSON))
    denied(await flt.check(c), 403, "not_own_data")
    assert PERSON not in repr(c.audit) and OTHER_PERSON not in repr(c.audit)


@pytest.mark.parametrize(
    "acr,ok",
    [
        ("idporten-loa-high", True),
        ("Level4", True),
        ("idporten-loa-substantial", False),
        ("Level3", False),
        ("idporten-loa-low", False),
        (None, False),
        ("something-else", False),
    ],
)
async def test_acr_levels(acr, ok):
    _, flt = build()
    d = await flt.check(ctx(token=idporten(PERSON, acr=acr), path=PERSON_PATH.format(pid=PERSON)))
    if ok:
        assert d is ALLOW
    else:
        denied(d, 403, "insufficient_acr")


async def test_acr_is_checked_before_the_pid():
    _, flt = build()
    d = await flt.check(
        ctx(token=idporten(PERSON, acr="idporten-loa-substantial"), path=PERSON_PATH.format(pid=OTHER_PERSON))
    )
    denied(d, 403, "insufficient_acr")


@pytest.mark.parametrize("pid", [PERSON[:-1] + str((int(PERSON[-1]) + 1) % 10), "1234567890", "abcdefghijk"])
async def test_invalid_pid_in_path_is_400(pid):
    _, flt = build()
    denied(
        await flt.check(ctx(token=idporten(PERSON), path=PERSON_PATH.format(pid=pid))),
        400,
        "invalid_national_identity_number",
    )


async def test_person_rule_with_pid_from_fails_closed_off_pid_paths():
    _, flt = build()
    for path in ("/innsyn/api/v1/status", "/innsyn/api/v1/PERSONER/" + OTHER_PERSON + "/x"):
        denied(
            await flt.check(ctx(token=idporten(PERSON), path=path)), 403, "not_own_data", "pid_not_in_path"
        )


@pytest.mark.parametrize(
    "tail", ["/%2e%2e/" + "{o}", "/../{o}", "/..;/{o}", "%2F..%2F{o}", "/.%2E/{o}", "\\..\\{o}"]
)
async def test_ambiguous_paths_are_refused(tail):
    _, flt = build()
    path = PERSON_PATH.format(pid=PERSON) + tail.format(o=OTHER_PERSON)
    denied(await flt.check(ctx(token=idporten(PERSON), path=path)), 400, "bad_request", "ambiguous_path")


async def test_person_rule_without_pid_from_admits_any_path():
    route = {**INNSYN, "access": {"any_of": [{"person": True, "acr": "idporten-loa-substantial"}]}}
    _, flt = build([route])
    assert await flt.check(ctx(token=idporten(PERSON, acr="Level3"), path="/innsyn/api/v1/status")) is ALLOW


# --- certificates and organisations ----------------------------------------------------------


async def test_certificate_org_rule():
    _, flt = build()
    c = ctx(cert=certificate(CERT_ORG), path="/innsyn/api/v1/status")
    assert await flt.check(c) is ALLOW and c.audit["authorize"]["kind"] == "certificate"
    denied(
        await flt.check(ctx(cert=certificate(NOT_ADMITTED_ORG), path="/innsyn/api/v1/status")),
        403,
        "access_denied",
        "certificate_org_not_admitted",
    )


async def test_organizations_rule_with_scopes():
    route = {
        **INNSYN,
        "organization_from": None,
        "access": {"any_of": [{"organizations": [OWNER_ORG], "scopes": ["ks:fiks"]}]},
    }
    _, flt = build([route])
    assert await flt.check(ctx(token=maskinporten(OWNER_ORG), path="/innsyn/x")) is ALLOW
    denied(
        await flt.check(ctx(token=maskinporten(OTHER_ORG), path="/innsyn/x")),
        403,
        "access_denied",
        "organization_not_admitted",
    )
    denied(
        await flt.check(ctx(token=maskinporten(OWNER_ORG, scopes=()), path="/innsyn/x")),
        403,
        "insufficient_scope",
    )
    denied(
        await flt.check(ctx(token=idporten(PERSON), path="/innsyn/x")),
        403,
        "access_denied",
        "no_consumer_org",
    )


# --- reason selection and modes --------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,reason",
    [
        # An integration without a grant: the person and certificate rules do not apply to it.
        (
            dict(token=maskinporten(), integ=verified(), path=ORG_PATH.format(org=OTHER_ORG)),
            "missing_privilege",
        ),
        # A person on an org path: the integration rule does not apply to persons.
        (dict(token=idporten(PERSON, acr="Level3"), path=PERSON_PATH.format(pid=PERSON)), "insufficient_acr"),
        # A certificate of another org, no token.
        (dict(cert=certificate(NOT_ADMITTED_ORG), path=ORG_PATH.format(org=GRANTING_ORG)), "access_denied"),
    ],
)
async def test_most_specific_reason_wins(kw, reason):
    _, flt = build()
    denied(await flt.check(ctx(**kw)), 403, reason)


async def test_detect_mode_records_and_lets_on():
    route = {**INNSYN, "access": {**INNSYN["access"], "mode": "detect"}}
    _, flt = build([route])
    assert flt.mode is Mode.detect
    c = integration_ctx(org=OTHER_ORG)
    assert await run_chain((flt,), c) is None
    assert [(d.filter, d.reason) for d in c.detections] == [("authorize", "missing_privilege")]


async def test_public_and_off_routes_get_no_filter():
    cfg = make_config(
        routes=[
            {"name": "open", "upstream": "u"},
            {**INNSYN, "name": "off", "access": {**INNSYN["access"], "mode": "off"}},
        ]
    )
    stage = mod.build_stage(env(cfg))
    assert stage.filters_for_route(cfg.routes[0]) == [] and stage.filters_for_route(cfg.routes[1]) == []


def test_grants_compile_to_a_set():
    cfg = make_config(
        integrations=[
            integration(
                grants=[
                    {"organization": GRANTING_ORG, "services": ["innsyn", "svarut"]},
                    {"organization": OTHER_ORG, "services": ["svarut"]},
                ]
            ),
            integration(OTHER_ID, grants=[]),
        ]
    )
    assert mod.compile_grants(cfg.integrations) == {
        (INTEGRATION_ID, GRANTING_ORG, "innsyn"),
        (INTEGRATION_ID, GRANTING_ORG, "svarut"),
        (INTEGRATION_ID, OTHER_ORG, "svarut"),
    }


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "access,message",
    [
        ({"any_of": []}, "at least one rule"),
        ({"any_of": [{"integration": True, "person": True}]}, "exactly one of"),
        ({"any_of": [{"scopes": ["x"]}]}, "exactly one of"),
        ({"any_of": [{"person": True, "acr": "Level9"}]}, "unknown acr"),
        ({"any_of": [{"integration": True, "acr": "Level4"}]}, "only apply to person rules"),
        ({"any_of": [{"person": True, "pid_from": "/personer/{pid}/"}]}, "path:/"),
        ({"any_of": [{"person": True, "pid_from": "path:/personer/{pid}x/"}]}, "whole path segment"),
        ({"any_of": [{"person": True, "pid_from": "path:/p/{pid}/{other}/"}]}, "exactly one {pid}"),
        ({"any_of": [{"certificate_orgs": ["12345"]}]}, "9-digit"),
        ({"any_of": [{"certificate_orgs": [CERT_ORG], "scopes": ["x"]}]}, "scopes need a token"),
    ],
)
def test_bad_access_config_is_reported(access, message):
    with pytest.raises(ConfigError) as e:
        make_config(routes=[{**INNSYN, "access": access}])
    assert message in str(e.value)


def test_integration_rule_needs_service_and_organization_from():
    route = {"name": "x", "upstream": "u", "access": {"any_of": [{"integration": True}]}}
    with pytest.raises(ConfigError) as e:
        make_config(routes=[route])
    assert "routes[0].access.any_of[0]: an integration rule needs the route's service" in str(e.value)
    assert "needs the route's organization_from" in str(e.value)


def test_template_compiler():
    p = mod.compile_path_template("path:/a/{pid}/b/", "pid")
    assert p.match("/a/123/b").group("v") == "123"
    assert p.match("/a/123/b/c").group("v") == "123"
    assert p.match("/a/123/bc") is None
    assert p.match("/x/a/123/b") is None
    assert mod.compile_path_template("path:/a/{pid}", "pid").match("/a/1/2").group("v") == "1"


@pytest.mark.parametrize(
    "policy",
    [
        "",  # no policy at all
        ", person: {}",  # red team 2, F11: a person route, where the privilege is the acting org's
    ],
)
def test_organization_from_without_access_rules_is_a_config_error(policy):
    from gateway.config import ConfigError, parse_config

    text = (
        "server: {plain_http: true}\n"
        'upstreams: {up: {url: "http://127.0.0.1:9001"}}\n'
        "routes: [{name: svc, upstream: up, service: post, "
        'organization_from: "path:/svc/orgs/{organization}/"' + policy + "}]\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert any(
        "routes[0].organization_from" in p and "has no effect without access" in p for p in e.value.problems
    ), e.value.problems
