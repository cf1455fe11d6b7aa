"""Acting for an organisation and delegated administration over HTTP (issue 16): the fake Altinn,
the admin API, the org's audit view, the hash chain, and the attacks kept as tests."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

from tests.fixtures.delegation import ADMIN_PID, ORG, OTHER_ORG, SECOND_PID, THIRD_PID, api

EAST = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:910000005"))
EAST_SCHOOL = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:910000013"))
WEST_PARENT = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:920000000"))
WEST_BERGEN = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:920000019"))
DELETED = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:930000004"))


async def _choose(b, party_uuid):
    return await api(b, "POST", "/portvakt/party", {"partyUuid": party_uuid}, csrf=None)


async def test_party_selection_with_fake_altinn(delegation_env):
    env = await delegation_env()
    b = await env.browser(ADMIN_PID, acr="idporten-loa-substantial")
    st, doc, _ = await api(b, "GET", "/portvakt/parties", csrf=None)
    assert st == 200, doc
    by = {p["partyUuid"]: p for p in doc["parties"]}
    assert by[EAST]["selectable"] and by[EAST_SCHOOL]["parentOrganizationNumber"] == ORG
    assert by[WEST_PARENT]["selectable"] is False and by[WEST_BERGEN]["selectable"] is True
    assert by[DELETED]["isDeleted"] is True and by[DELETED]["selectable"] is False
    assert ADMIN_PID not in json.dumps(doc)  # the person party's personId is never kept
    # The Altinn call: resource-owner shape, Maskinporten -> Altinn token exchange.
    assert env.altinn.counts["token"] == 1 and env.altinn.counts["exchange"] == 1
    assert env.altinn.requests[0]["body"] == {"type": "urn:altinn:person:identifier-no", "value": ADMIN_PID}
    assert env.altinn.requests[0]["query"]["includeAltinn2"] == "false"
    # Before choosing: a party route says so.
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 403 and doc["reason"] == "party_required"
    # Not in the list, deleted, hierarchy-only: 403, nothing chosen.
    for bad in (str(uuid.uuid4()), DELETED, WEST_PARENT):
        st, doc, _ = await _choose(b, bad)
        assert st == 403 and doc["reason"] == "party_not_held", (bad, doc)
    st, doc, _ = await _choose(b, EAST_SCHOOL)
    assert st == 200 and doc["chosen"]["organizationNumber"] == "910000013"
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 200, doc
    h = doc["headers"]
    assert h["X-Portvakt-Acting-Org"] == "910000013"
    claims = json.loads(base64.urlsafe_b64decode(h["X-Portvakt-Assertion"].split(".")[1] + "=="))
    assert claims["acting_org"] == "910000013"
    # A client cannot set the header itself.
    st, doc, _ = await api(b, "GET", "/app/own", csrf=None, headers={"X-Portvakt-Acting-Org": "999999999"})
    assert st == 200 and "X-Portvakt-Acting-Org" not in doc["headers"]
    # Altinn down: the cached list serves until the TTL; then party routes 503, own routes work.
    env.altinn.down = True
    import asyncio

    await asyncio.sleep(2.2)
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 503 and doc["reason"] == "role_source_unavailable"
    assert env.altinn.counts["parties"] >= 2  # the list older than the TTL was asked for again
    st, doc, _ = await api(b, "GET", "/app/own", csrf=None)
    assert st == 200
    # Altinn back, and the person lost the sub-unit: the next request is refused (re-checked).
    env.altinn.down = False
    env.altinn.parties[ADMIN_PID] = [
        p for p in env.altinn.parties[ADMIN_PID] if p["organizationNumber"] != ORG
    ]
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 403 and doc["reason"] == "party_not_held"
    await env.penv.settle()
    sel = [r for r in env.penv.audit() if r.get("type") == "party_selected"]
    assert len(sel) == 1 and sel[0]["organization"] == "910000013" and "pseudonym" in sel[0]["person"]
    assert ADMIN_PID not in json.dumps(env.penv.audit())


async def test_delegated_admin_flow_and_chain(delegation_env):
    env = await delegation_env()
    admin = await env.browser(ADMIN_PID)
    second = await env.browser(SECOND_PID)
    # The seeded admin lists and grants service admin for "post" to the second person.
    st, doc, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 200 and [g["role"] for g in doc["grants"]] == ["admin"] and doc["grants"][0]["seeded"]
    assert ADMIN_PID not in json.dumps(doc)
    # The second person is nobody yet: the post admin route refuses them.
    env.altinn.parties[SECOND_PID] = env.altinn.parties[ADMIN_PID]
    st, doc, _ = await _choose(second, EAST)
    assert st == 200, doc
    st, doc, _ = await api(second, "GET", "/post-admin/x", csrf=None)
    assert st == 403 and doc["reason"] == "privilege_missing"
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": SECOND_PID}, "role": "admin", "service": "post", "basis": "tjenesteforvalter"},
    )
    assert st == 201, doc
    gid = doc["id"]
    st, doc, _ = await api(second, "GET", "/post-admin/x", csrf=None)
    assert st == 200 and doc["headers"]["X-Portvakt-Acting-Org"] == ORG
    st, doc, _ = await api(second, "GET", "/tax-admin/x", csrf=None)
    assert st == 403  # another service
    # The service admin sees their service's grants, may grant "send" within it, nothing further.
    st, doc, _ = await api(second, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 200 and {g["service"] for g in doc["grants"]} == {"post"}
    for body, reason in (
        ({"subject": {"person": THIRD_PID}, "role": "admin", "service": "post"}, "admin_grant_not_allowed"),
        ({"subject": {"person": THIRD_PID}, "role": "admin"}, "outside_service"),
        ({"subject": {"person": THIRD_PID}, "role": "send", "service": "tax"}, "outside_service"),
        ({"subject": {"person": SECOND_PID}, "role": "admin"}, "self_grant"),  # grant yourself admin
    ):
        st, doc, _ = await api(second, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body)
        assert st == 403 and doc["reason"] == reason, (body, doc)
    st, doc, _ = await api(
        second,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": THIRD_PID}, "role": "send", "service": "post"},
    )
    assert st == 201, doc
    send_gid = doc["id"]
    # Withdrawal: effective on the next request.
    st, doc, _ = await api(admin, "DELETE", f"/portvakt/admin/orgs/{ORG}/grants/{gid}")
    assert st == 204, doc
    st, doc, _ = await api(second, "GET", "/post-admin/x", csrf=None)
    assert st == 403 and doc["reason"] == "privilege_missing"
    st, doc, _ = await api(second, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 403 and doc["reason"] == "not_admin"
    # The seeded admin cannot be removed through the API; an org keeps one admin.
    st, doc, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    seed = next(g for g in doc["grants"] if g["seeded"])
    st, doc, _ = await api(admin, "DELETE", f"/portvakt/admin/orgs/{ORG}/grants/{seed['id']}")
    assert st == 409 and doc["reason"] == "seeded_grant"
    st, doc, _ = await api(admin, "DELETE", f"/portvakt/admin/orgs/{ORG}/grants/{send_gid}")
    assert st == 204
    await env.penv.settle()
    recs = env.penv.audit()
    granted = [r for r in recs if r.get("type") == "privilege_granted"]
    withdrawn = [r for r in recs if r.get("type") == "privilege_withdrawn"]
    assert len(granted) == 2 + 2 and len(withdrawn) == 2  # two seeds + two grants
    g = next(r for r in granted if r.get("grant") == gid)
    assert g["role"] == "admin" and g["service"] == "post" and g["basis"] == "tjenesteforvalter"
    assert "pseudonym" in g["person"] and "pseudonym" in g["subject"]["person"]
    dump = json.dumps(recs)
    assert ADMIN_PID not in dump and SECOND_PID not in dump and THIRD_PID not in dump
    # Every change is in the hash chain, and the chain verifies.
    key_file = env.penv.audit_path.parent / "k"
    key_file.write_text("test-audit-key-0123456789")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "audit",
            "verify",
            "--key-file",
            str(key_file),
            str(env.penv.audit_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr


async def test_attacks_csrf_level_last_admin_foreign_org(delegation_env):
    env = await delegation_env()
    admin = await env.browser(ADMIN_PID)
    other = await env.browser(THIRD_PID)  # admin of OTHER_ORG only
    body = {"subject": {"person": SECOND_PID}, "role": "user", "service": "post"}
    # Replay a CSRF token: the first use works, the second is refused.
    st, doc, _ = await api(admin, "GET", "/portvakt/admin/csrf", csrf=None)
    tok = doc["csrf_token"]
    st, doc, _ = await api(admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body, csrf=tok)
    assert st == 201, doc
    st, doc, _ = await api(
        admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", {**body, "role": "send"}, csrf=tok
    )
    assert st == 403 and doc["reason"] == "csrf_failed"
    # No token, another session's token, cross-site, wrong origin, a form content type.
    st, doc, _ = await api(admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body, csrf=None)
    assert st == 403 and doc["reason"] == "csrf_failed"
    st, doc, _ = await api(other, "GET", "/portvakt/admin/csrf", csrf=None)
    st, doc, _ = await api(admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body, csrf=doc["csrf_token"])
    assert st == 403 and doc["reason"] == "csrf_failed"
    st, doc, _ = await api(
        admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert st == 403 and doc["reason"] == "csrf_failed"
    st, doc, _ = await api(
        admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", body, headers={"Origin": "https://evil.example"}
    )
    assert st == 403 and doc["reason"] == "csrf_failed"
    # Another org's grants and trail: refused, and the refusal is audited.
    for path in (f"/portvakt/admin/orgs/{OTHER_ORG}/grants", f"/portvakt/admin/orgs/{OTHER_ORG}/audit"):
        st, doc, _ = await api(admin, "GET", path, csrf=None)
        assert st == 403 and doc["reason"] == "not_admin"
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{OTHER_ORG}/grants",
        {"subject": {"person": ADMIN_PID}, "role": "admin"},
    )
    assert st == 403 and doc["reason"] == "not_admin"
    # Malformed input: precise 400s, never 5xx.
    for bad in (
        [],
        {"subject": "x"},
        {"subject": {"person": "123"}, "role": "user"},
        {"subject": {"person": SECOND_PID}, "role": "root"},
        {"subject": {"person": SECOND_PID}, "role": "user", "service": "nope"},
        {"subject": {"integration": "not-a-uuid"}, "role": "user", "service": "post"},
        {"x": 1},
    ):
        st, doc, _ = await api(admin, "POST", f"/portvakt/admin/orgs/{ORG}/grants", bad)
        assert st == 400 and doc["reason"] == "grant_invalid", (bad, doc)
    st, doc, _ = await api(admin, "GET", "/portvakt/admin/orgs/12ab/grants", csrf=None)
    assert st == 400
    # Remove the last admin: make a second org admin, withdraw the seed's peer, then try the last one.
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": SECOND_PID}, "role": "admin"},
    )
    assert st == 201
    second = await env.browser(SECOND_PID)
    st, doc, _ = await api(
        second, "DELETE", f"/portvakt/admin/orgs/{ORG}/grants/{doc['id']}"
    )  # gives up own admin
    assert st == 204, doc
    # A substantial session is not enough for the admin API (acr high by default).
    low = await env.browser(ADMIN_PID, acr="idporten-loa-substantial")
    st, doc, h = await api(low, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 401 and doc["reason"] == "step_up_required" and "idporten-loa-high" in h["WWW-Authenticate"]
    # Act for a party you do not hold: the other org's admin is not in Altinn for ORG.
    st, doc, _ = await _choose(other, EAST)
    assert st == 403 and doc["reason"] == "party_not_held"


async def test_last_admin_is_kept(delegation_env):
    from filters.delegation.config import PrivilegeStoreConfig
    from filters.delegation.store import LastAdmin, SqliteStore

    env = await delegation_env()
    path = env.section["store"]["path"]
    store = SqliteStore(PrivilegeStoreConfig(path=path), path)
    await store.start()
    try:
        org = "930000004"
        g = {
            "id": "g-a",
            "organization": org,
            "subject": {"kind": "person", "ref": "r1", "display": "x"},
            "role": "admin",
            "service": "*",
        }
        await store.add(g)
        await store.add({**g, "id": "g-b", "subject": {"kind": "person", "ref": "r2", "display": "y"}})
        assert (await store.remove(org, "g-a"))["id"] == "g-a"
        try:
            await store.remove(org, "g-b")
            raise AssertionError("the last admin was removed")
        except LastAdmin:
            pass
        assert [x["id"] for x in await store.grants(org)] == ["g-b"]
        # Over HTTP: an organisation whose only administrator was granted at run time (no seed).
        from filters.delegation import subject_ref
        from tests.fixtures.delegation import SUBJECT_KEY

        solo = "940000000"
        await store.add(
            {
                "id": "g-solo",
                "organization": solo,
                "role": "admin",
                "service": "*",
                "subject": {
                    "kind": "person",
                    "ref": subject_ref(SUBJECT_KEY.encode(), SECOND_PID),
                    "display": "x",
                },
            }
        )
    finally:
        await store.close()
    second = await env.browser(SECOND_PID)
    st, doc, _ = await api(second, "DELETE", f"/portvakt/admin/orgs/{solo}/grants/g-solo")
    assert st == 409 and doc["reason"] == "last_admin"
    st, doc, _ = await api(second, "GET", f"/portvakt/admin/orgs/{solo}/grants", csrf=None)
    assert [g["id"] for g in doc["grants"]] == ["g-solo"]
    await env.penv.settle()
    refused = [r for r in env.penv.audit() if r.get("type") == "admin_refused"]
    assert refused and refused[-1]["reason"] == "last_admin" and refused[-1]["organization"] == solo


async def test_org_audit_view_own_records_only(delegation_env):
    env = await delegation_env()
    admin = await env.browser(ADMIN_PID)
    other = await env.browser(THIRD_PID)
    env.altinn.parties[THIRD_PID] = env.altinn.parties[ADMIN_PID]
    await _choose(admin, EAST)
    await _choose(other, WEST_BERGEN)
    for b in (admin, other):
        st, _, _ = await api(b, "GET", "/org/doc", csrf=None)
        assert st == 200
    await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": SECOND_PID}, "role": "user", "service": "post"},
    )
    await env.penv.settle()
    st, doc, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?limit=500", csrf=None)
    assert st == 200, doc
    recs = doc["records"]
    types = {r.get("type") for r in recs}
    assert {"request", "privilege_granted", "party_selected"} <= types
    for r in recs:
        blob = json.dumps(r)
        assert OTHER_ORG not in blob and "920000000" not in blob, r
        assert "sealed" not in blob and ADMIN_PID not in blob and SECOND_PID not in blob
    reqs = [r for r in recs if r.get("type") == "request"]
    assert reqs and all(r["facts"]["party"]["acting_org"] == ORG for r in reqs)
    # Pseudonyms are per organisation: not the trail's own.
    trail_ps = {r["person"]["pseudonym"] for r in env.penv.audit() if isinstance(r.get("person"), dict)}
    view_ps = {r["person"]["pseudonym"] for r in recs if isinstance(r.get("person"), dict)}
    assert view_ps and not (view_ps & trail_ps)
    # Filters and pagination.
    st, page1, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?limit=1", csrf=None)
    assert len(page1["records"]) == 1 and page1["next_cursor"] == "1"
    st, page2, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?limit=1&cursor=1", csrf=None)
    assert page2["records"] != page1["records"]
    st, svc, _ = await api(
        admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?service=post&limit=500", csrf=None
    )
    assert svc["records"] and all(r.get("service") == "post" for r in svc["records"])
    me = next(iter(view_ps))
    st, mine, _ = await api(
        admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?caller={me}&limit=500", csrf=None
    )
    assert mine["records"] and len(mine["records"]) < len(recs) + 5
    st, doc, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?since=yesterday", csrf=None)
    assert st == 400
    st, future, _ = await api(
        admin, "GET", f"/portvakt/admin/orgs/{ORG}/audit?since=2999-01-01T00:00:00Z", csrf=None
    )
    assert future["records"] == []
    # Reading is audited.
    await env.penv.settle()
    reads = [r for r in env.penv.audit() if r.get("type") == "audit_read"]
    assert len(reads) >= 5 and all(r["organization"] == ORG for r in reads)


async def test_withdrawal_holds_on_another_gateway_process_sharing_redis(
    delegation_env, shared_redis, start_gateway, tmp_path
):
    """Sessions and privileges in Redis: a single server, or a three-master Redis Cluster."""
    import copy

    env = await delegation_env(store={"backend": "redis", "url": shared_redis.url})
    cfg2 = copy.deepcopy(env.config)
    cfg2["audit"]["path"] = str(tmp_path / "audit2" / "audit.jsonl")
    gw2 = await start_gateway(cfg2)
    admin = await env.browser(ADMIN_PID)
    second = await env.browser(SECOND_PID)
    env.altinn.parties[SECOND_PID] = env.altinn.parties[ADMIN_PID]
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": SECOND_PID}, "role": "admin", "service": "post"},
    )
    assert st == 201, doc
    gid = doc["id"]

    async def on_gw2(path: str) -> tuple[int, dict]:
        # The same browser (cookie jar) against the second process: sessions, party and grants all in Redis.
        async with second.session.get(gw2.url + path, headers={"Accept": "application/json"}) as r:
            return r.status, await r.json(content_type=None)

    st, doc, _ = await _choose(second, EAST)
    assert st == 200
    st, doc = await on_gw2("/post-admin/x")
    assert st == 200 and doc["headers"]["X-Portvakt-Acting-Org"] == ORG
    st, doc, _ = await api(admin, "DELETE", f"/portvakt/admin/orgs/{ORG}/grants/{gid}")  # on process 1
    assert st == 204
    st, doc = await on_gw2("/post-admin/x")  # the very next request, on process 2
    assert st == 403 and doc["reason"] == "privilege_missing"
    # The store holds no pid in clear.
    dump = b"".join(k + (v or b"") for k, v in await shared_redis.items("*"))
    assert dump
    assert SECOND_PID.encode() not in dump and ADMIN_PID.encode() not in dump


async def test_rate_limit_cross_site_party_and_escaped_page(delegation_env):
    env = await delegation_env(admin_api={"requests_per_minute": 6})
    admin = await env.browser(ADMIN_PID)
    # A hostile basis is stored as text and shown escaped on the page.
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {
            "subject": {"person": SECOND_PID},
            "role": "user",
            "service": "post",
            "basis": "<script>alert(1)</script>",
        },
    )
    assert st == 201
    async with admin.session.get(env.url + "/portvakt/admin/", headers={"Accept": "text/html"}) as r:
        body = await r.text()
        assert r.status == 200 and "script-src" not in r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert "<script>" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert SECOND_PID not in body and SECOND_PID[:6] + "*****" in body
    # Red team 2, F10: a person number typed into the free-text basis is masked before it is
    # stored, shown or audited.
    basis = f"vedtak 2026/17 om {THIRD_PID} ({THIRD_PID[:6]} {THIRD_PID[6:]})"
    st, doc, _ = await api(
        admin,
        "POST",
        f"/portvakt/admin/orgs/{ORG}/grants",
        {"subject": {"person": THIRD_PID}, "role": "user", "service": "post", "basis": basis},
    )
    assert st == 201 and THIRD_PID not in json.dumps(doc) and THIRD_PID[6:] not in json.dumps(doc)
    st, doc, _ = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 200 and "vedtak 2026/17 om ***********" in json.dumps(doc)
    assert THIRD_PID not in json.dumps(doc) and THIRD_PID[6:] not in json.dumps(doc)
    await env.penv.settle()
    assert THIRD_PID not in json.dumps(env.penv.audit()) and THIRD_PID[6:] not in json.dumps(env.penv.audit())
    # Choosing a party from another site is refused before anything is read.
    st, doc, _ = await api(
        admin,
        "POST",
        "/portvakt/party",
        {"partyUuid": EAST},
        csrf=None,
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert st == 403 and doc["reason"] == "csrf_failed"
    # Without a session: 401 JSON, never a party.
    async with env.gw.session() as anon:
        async with anon.post(env.url + "/portvakt/party", json={"partyUuid": EAST}) as r:
            assert r.status == 401 and (await r.json())["reason"] == "login_required"
        async with anon.get(
            env.url + "/portvakt/admin/orgs/910000005/grants", headers={"Accept": "application/json"}
        ) as r:
            assert r.status == 401
    # Altinn down and no party chosen yet: the route says "choose one", not 503 (Altinn not asked).
    env.altinn.down = True
    fresh = await env.browser(SECOND_PID)
    before = env.altinn.counts["parties"]
    st, doc, _ = await api(fresh, "GET", "/org/x", csrf=None)
    assert st == 403 and doc["reason"] == "party_required" and env.altinn.counts["parties"] == before
    st, doc, _ = await api(fresh, "GET", "/portvakt/parties", csrf=None)
    assert st == 503 and doc["reason"] == "role_source_unavailable"
    env.altinn.down = False
    # The admin API is rate-limited per session: 429 with Retry-After.
    statuses = []
    for _ in range(8):
        st, doc, h = await api(admin, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
        statuses.append(st)
    assert statuses[-1] == 429 and h["Retry-After"] == "60" and doc["reason"] == "admin_rate_limited"


async def test_integration_needs_the_orgs_run_time_grant_within_the_yaml_ceiling(delegation_env, issuer):
    from tests.e2e.helpers_identity import GRANTING_ORG, INTEGRATION_ID, bearer, creds, integration_entry
    from tests.e2e.helpers_identity import OTHER_ORG as NO_YAML_ORG

    def hook(cfg: dict) -> None:
        cfg["issuers"] = issuer.issuers_config()
        # The operator's YAML grant (the ceiling): GRANTING_ORG -> service post. NO_YAML_ORG has none.
        cfg["integrations"] = [
            integration_entry(grants=[{"organization": GRANTING_ORG, "services": ["post"]}])
        ]
        cfg["integrations_policy"] = {"password_hash_floor": "none"}  # the cheap test hash is below the floor
        cfg["routes"].insert(
            0,
            {
                "name": "post-api",
                "match": {"path_prefix": "/post-api/"},
                "upstream": "app",
                "service": "post",
                "organization_from": "path:/post-api/orgs/{organization}/",
                "access": {"any_of": [{"integration": True, "scopes": ["ks:fiks"]}]},
                "privilege": {"role": "send"},
            },
        )
        cfg["delegation"]["admins"] += [
            {"organization": GRANTING_ORG, "person": ADMIN_PID},
            {"organization": NO_YAML_ORG, "person": ADMIN_PID},
        ]

    env = await delegation_env(extra_hook=hook)
    admin = await env.browser(ADMIN_PID)
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}

    async def call(org: str) -> tuple[int, dict]:
        async with env.gw.session() as s:
            async with s.get(f"{env.url}/post-api/orgs/{org}/sendinger", headers=headers) as r:
                return r.status, await r.json(content_type=None)

    st, doc = await call(GRANTING_ORG)
    assert (
        st == 403 and doc["reason"] == "privilege_missing"
    )  # the YAML grant alone is not the org's run-time grant
    grants = {}
    for org in (GRANTING_ORG, NO_YAML_ORG):
        st, doc, _ = await api(
            admin,
            "POST",
            f"/portvakt/admin/orgs/{org}/grants",
            {"subject": {"integration": INTEGRATION_ID}, "role": "send", "service": "post"},
        )
        assert st == 201, doc
        grants[org] = doc["id"]
    st, doc = await call(GRANTING_ORG)
    assert st == 200 and doc["headers"]["X-Portvakt-Integration-Id"] == INTEGRATION_ID
    st, doc = await call(NO_YAML_ORG)  # a run-time grant cannot open what the operator has not
    assert st == 403 and doc["reason"] != "privilege_missing"
    st, doc, _ = await api(
        admin, "DELETE", f"/portvakt/admin/orgs/{GRANTING_ORG}/grants/{grants[GRANTING_ORG]}"
    )
    assert st == 204
    st, doc = await call(GRANTING_ORG)  # withdrawn: the next request is refused
    assert st == 403 and doc["reason"] == "privilege_missing"
    await env.penv.settle()
    ev = [
        r
        for r in env.penv.audit()
        if r.get("type") in ("privilege_granted", "privilege_withdrawn")
        and r.get("subject", {}).get("kind") == "integration"
    ]
    assert [r["type"] for r in ev] == ["privilege_granted", "privilege_granted", "privilege_withdrawn"]
    assert ev[0]["subject"]["integration_id"] == INTEGRATION_ID
