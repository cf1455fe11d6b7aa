"""Red team 3 (outside attack on main at 50e4f0a): each finding kept as a reproduction.

F01: ``/PORTVAKT/login`` (a case variant of the persons' endpoint prefix) was proxied to the
     catch-all route; a case-insensitive upstream serves it as the gateway's own path.
F02: an upstream's unsolicited ``101 Switching Protocols`` was relayed to the client while the
     gateway went on reading the connection as HTTP: a proxy in front that honours the 101 turns
     the client connection into a blind tunnel (its own checks skipped for what follows).
F03: ``POST /portvakt/party`` as a form (a "simple" request any page can send, no preflight)
     changed the person's acting organisation without the session's CSRF token; only the
     browser's Origin/Sec-Fetch-Site, when sent, stood in the way.
F05: an administrator removed from ``delegation.admins`` kept the seeded ``admin`` on ``*`` across
     a reload (and a restart): the seed only ever added. The README promises that such a grant is
     withdrawn by changing the config; a departed administrator kept every privilege.
F07: ``tracing.otlp`` with ``tracing.propagate: false`` was refused by check-config: an operator
     could not export spans without handing the trace ids to an upstream they do not trust with them.
F09: an unknown method token carrying a fødselsnummer (``SECRET24917397852 /x``) reached the access
     log and the audit record unmasked.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid

import pytest
import yaml

from tests.fixtures.delegation import ADMIN_PID, ORG, OTHER_ORG, THIRD_PID, api
from tests.fixtures.gateway import basic_config

pytestmark = pytest.mark.e2e


# -- F01 ------------------------------------------------------------------------------------------


@pytest.fixture
async def env(persons_env):
    return await persons_env()


@pytest.mark.parametrize("path", ["/PORTVAKT/login", "/Portvakt/session", "/PORTVAKT/admin/x", "/pORTVAKT/"])
async def test_case_variant_of_persons_prefix_is_refused(env, path):
    before = len(env.up.requests)
    async with env.gw.session() as s, s.get(env.gw.url + path, allow_redirects=False) as r:
        assert r.status == 400, (path, r.status)
        body = await r.json()
    assert body["reason"] == "path_not_canonical"
    assert len(env.up.requests) == before  # never reached the catch-all's upstream
    lines = await env.gw.access_lines(1, lambda x: x.get("path") == path)
    assert lines[-1]["status"] == 400


async def test_persons_prefix_itself_and_lookalikes_still_route(env):
    async with env.gw.session() as s:
        # the exact prefix is the gateway's own endpoint, not a case variant
        async with s.get(env.gw.url + "/portvakt/session", allow_redirects=False) as r:
            assert r.status != 400 or (await r.json())["reason"] != "path_not_canonical"
        # not under the prefix: the catch-all serves them as before
        for path in ("/PORTVAKTX/y", "/other/PORTVAKT/login"):
            async with s.get(env.gw.url + path, allow_redirects=False) as r:
                assert r.status == 200, (path, r.status)


async def test_case_variant_of_persons_prefix_passes_with_case_sensitive_upstream(persons_env):
    env = await persons_env(
        config_hook=lambda cfg: cfg.setdefault("http", {}).update(case_sensitive_upstream=True)
    )
    async with env.gw.session() as s, s.get(env.gw.url + "/PORTVAKT/login", allow_redirects=False) as r:
        assert r.status == 200  # the operator said every upstream is case-sensitive: the catch-all's


# -- F02 ------------------------------------------------------------------------------------------


UPGRADE_ANSWER = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nTUNNELLED-BYTES"
)


@pytest.fixture
async def switching_upstream():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/switch"):
                    writer.write(UPGRADE_ANSWER)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def _raw_exchange(gw, data: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=gw._pki.ca_cert)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(data)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (TimeoutError, ssl.SSLError, ConnectionError):
                    break
                if not chunk:
                    break
                out += chunk
    return out


async def test_unsolicited_101_from_upstream_is_a_502(start_gateway, switching_upstream):
    gw = await start_gateway(basic_config(switching_upstream))
    # A plain request, then a second one on the same connection.
    out = await asyncio.to_thread(
        _raw_exchange,
        gw,
        b"GET /switch HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert b" 101 " not in out.split(b"\r\n", 1)[0], out[:300]
    assert out.startswith(b"HTTP/1.1 502 "), out[:300]
    assert b"TUNNELLED-BYTES" not in out
    assert b'"reason":"upstream_unavailable"' in out
    lines = await gw.access_lines(1, lambda x: x.get("path") == "/switch")
    assert lines[-1]["status"] == 502
    # the upstream connection that switched is not reused: the next request gets a clean answer
    async with gw.session() as s, s.get(gw.url + "/next") as r:
        assert r.status == 200
        assert await r.text() == "ok"


# -- F03 ------------------------------------------------------------------------------------------

EAST = str(uuid.uuid5(uuid.NAMESPACE_URL, "altinn-org:910000005"))


async def _form_choose(b, fields: dict) -> tuple[int, str]:
    # No Origin, no Sec-Fetch-*: what a browser without them (or a same-site page) sends.
    async with b.session.post(b.gw.url + "/portvakt/party", data=fields, allow_redirects=False) as r:
        return r.status, await r.text()


async def test_party_choice_by_form_needs_the_sessions_csrf_token(delegation_env):
    env = await delegation_env()
    b = await env.browser(ADMIN_PID)
    st, body = await _form_choose(b, {"partyUuid": EAST})
    assert st == 403 and '"csrf_failed"' in body, (st, body)
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 403 and doc["reason"] == "party_required"  # nothing was chosen
    # another session's token does not do either
    other = await env.browser(ADMIN_PID)
    st, doc, _ = await api(other, "GET", "/portvakt/admin/csrf", csrf=None)
    st, body = await _form_choose(b, {"partyUuid": EAST, "csrf": doc["csrf_token"]})
    assert st == 403 and '"csrf_failed"' in body
    # with this session's token the form works, once
    st, doc, _ = await api(b, "GET", "/portvakt/admin/csrf", csrf=None)
    token = doc["csrf_token"]
    st, body = await _form_choose(b, {"partyUuid": EAST, "csrf": token})
    assert st == 303, (st, body)
    st, doc, _ = await api(b, "GET", "/org/x", csrf=None)
    assert st == 200 and doc["headers"]["X-Portvakt-Acting-Org"] == ORG
    st, body = await _form_choose(b, {"partyUuid": EAST, "csrf": token})
    assert st == 403 and '"csrf_failed"' in body  # one use
    # JSON (a preflighted request from any other origin) works as before, without a token
    st, doc, _ = await api(b, "POST", "/portvakt/party", {"partyUuid": EAST}, csrf=None)
    assert st == 200, doc


# -- F05 ------------------------------------------------------------------------------------------


async def _seeded_admin_removed_by_config(env) -> None:
    b = await env.browser(ADMIN_PID)
    st, doc, _ = await api(b, "POST", "/portvakt/party", {"partyUuid": EAST}, csrf=None)
    assert st == 200, doc
    st, doc, _ = await api(b, "GET", "/post-admin/x", csrf=None)
    assert st == 200, doc
    # The operator names another first administrator of ORG and drops ADMIN_PID.
    cfg = yaml.safe_load(open(env.gw.config_path).read())
    cfg["delegation"]["admins"] = [{"organization": ORG, "person": THIRD_PID}]
    env.gw.write_config(cfg)
    assert await env.gw.reload() == "success"
    st, doc, _ = await api(b, "GET", "/post-admin/x", csrf=None)
    assert st == 403 and doc["reason"] == "privilege_missing", (st, doc)
    st, doc, _ = await api(b, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 403 and doc["reason"] == "not_admin", (st, doc)
    # the new first administrator holds it, seeded; the audit trail says who lost what
    third = await env.browser(THIRD_PID)
    st, doc, _ = await api(third, "GET", f"/portvakt/admin/orgs/{ORG}/grants", csrf=None)
    assert st == 200 and [g["seeded"] for g in doc["grants"]] == [True], doc
    await env.penv.settle()

    def withdrawn() -> list[dict]:
        return [
            r for r in env.penv.audit() if r.get("type") == "privilege_withdrawn" and r.get("by") == "config"
        ]

    # ADMIN_PID in ORG and THIRD_PID in OTHER_ORG are no longer configured: both withdrawn, once
    assert sorted(r["organization"] for r in withdrawn()) == sorted([ORG, OTHER_ORG]), withdrawn()
    assert ADMIN_PID not in json.dumps(withdrawn()) and THIRD_PID not in json.dumps(withdrawn())
    assert await env.gw.reload() == "success"
    await env.penv.settle()
    assert len(withdrawn()) == 2  # a reload with the same config withdraws nothing more


async def test_seeded_admin_removed_from_config_loses_the_grant_sqlite(delegation_env):
    await _seeded_admin_removed_by_config(await delegation_env())


async def test_seeded_admin_removed_from_config_loses_the_grant_redis(delegation_env, redis_server):
    await _seeded_admin_removed_by_config(
        await delegation_env(store={"backend": "redis", "url": redis_server.url})
    )


# -- F07 ------------------------------------------------------------------------------------------


async def test_otlp_spans_without_propagating_traceparent(start_gateway, upstream, otlp_receiver):
    rx = otlp_receiver
    gw = await start_gateway(
        basic_config(
            upstream.url,
            tracing={"propagate": False, "otlp": {"endpoint": rx.url, "export_interval_seconds": 0.2}},
        )
    )
    async with (
        gw.session() as s,
        s.get(gw.url + "/quiet", headers={"traceparent": "00-" + "b" * 32 + "-" + "c" * 16 + "-01"}) as r,
    ):
        assert r.status == 200
    sent = {k.lower() for k in upstream.requests[-1]["headers"]}
    assert "traceparent" not in sent and "tracestate" not in sent
    lines = await gw.access_lines(1, lambda x: x.get("path") == "/quiet")
    trace_id = lines[-1]["trace_id"]
    assert trace_id and trace_id != "b" * 32  # an untrusted client's trace is not continued
    spans = await rx.wait_for(lambda spans: any(sp["trace_id"] == trace_id for sp in spans))
    assert any(sp["trace_id"] == trace_id for sp in spans)


# -- F09 ------------------------------------------------------------------------------------------

PID = "24917397852"


async def test_a_person_number_in_an_unknown_method_is_masked(start_gateway, upstream, tmp_path):
    audit_path = tmp_path / "audit" / "audit.jsonl"
    gw = await start_gateway(basic_config(upstream.url, audit={"path": str(audit_path), "key": "k" * 32}))
    for method in (f"X{PID}", f"GET{PID[:6]}-{PID[6:]}"):
        out = await asyncio.to_thread(
            _raw_exchange, gw, f"{method} /m HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )
        assert out.split(b" ", 2)[1] in (b"405", b"400"), out[:200]
        assert PID.encode() not in out and PID[6:].encode() not in out
    lines = await gw.access_lines(2, lambda x: x.get("status") in (400, 405))
    assert len(lines) >= 2
    await asyncio.sleep(0.5)  # the audit batch (50 ms) reaches the file
    text = gw.output() + audit_path.read_text()
    assert PID not in text and PID[6:] not in text, [line for line in text.splitlines() if PID[6:] in line]
    # an ordinary method name is logged as sent
    async with gw.session() as s, s.request("PROPFIND", gw.url + "/p") as r:
        assert r.status == 405
    lines = await gw.access_lines(1, lambda x: x.get("method") == "PROPFIND")
    assert lines
