"""Delegated administration in headless Chromium: the seeded admin grants a service-admin role
through the server-rendered page; the second person then reaches that service's admin route."""

from __future__ import annotations

import json
import uuid

from tests.fixtures.delegation import ADMIN_PID, ORG, SECOND_PID
from tests.fixtures.persons import dev_login


async def test_admin_page_grant_then_service_admin_route(delegation_env, chromium):
    env = await delegation_env()
    env.altinn.parties[SECOND_PID] = env.altinn.parties[ADMIN_PID]
    ctx = await chromium()
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(env.url + "/portvakt/admin/")
    await dev_login(page, acr="idporten-loa-high", pid=ADMIN_PID)
    await page.wait_for_url(env.url + "/portvakt/admin/")
    assert (await page.inner_text("#org")) == ORG
    await page.fill("#person", SECOND_PID)
    await page.select_option("#role", "admin")
    await page.select_option("#service", "post")
    await page.fill("#basis", "tjenesteforvalter")
    await page.click("#grant-submit")
    await page.wait_for_load_state()
    assert "Tilganger" in await page.content(), await page.content()
    await page.wait_for_selector("tr.grant >> nth=1")
    rows = await page.locator("tr.grant").all_inner_texts()
    assert any("admin" in r and "post" in r and SECOND_PID[:6] + "*****" in r for r in rows), rows
    assert SECOND_PID not in await page.content()
    # The second person, in their own browser: choose the party, reach the post admin route.
    ctx2 = await chromium()
    p2 = await ctx2.new_page()
    await p2.goto(env.url + "/app/")
    await dev_login(p2, acr="idporten-loa-high", pid=SECOND_PID)
    await p2.wait_for_url(env.url + "/app/")
    east = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:910000005"))
    r = await p2.evaluate(
        """async (u) => { const r = await fetch('/portvakt/party', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({partyUuid: u})}); return r.status }""",
        east,
    )
    assert r == 200
    await p2.goto(env.url + "/post-admin/overview")
    doc = json.loads(await p2.inner_text("body"))
    assert doc["headers"]["X-Portvakt-Acting-Org"] == ORG
    # Their admin page shows only their service and no admin role to hand out.
    await p2.goto(env.url + "/portvakt/admin/")
    assert "post" in await p2.inner_text("#scope")
    assert await p2.locator("#role option").all_inner_texts() == ["user", "send"]
    # Withdrawal from the first browser: the next request of the second is refused.
    await page.click("tr.grant:has-text('post') button.withdraw")
    await page.wait_for_load_state()
    resp = await p2.goto(env.url + "/post-admin/overview")
    assert resp.status == 403
    await env.penv.settle()
    kinds = [r.get("type") for r in env.penv.audit()]
    assert "privilege_granted" in kinds and "privilege_withdrawn" in kinds
    assert not [e for e in errors if "status of 404" not in e], errors  # the 404 is /favicon.ico
