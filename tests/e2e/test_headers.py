"""Header hygiene at the proxy: hop-by-hop, Connection, X-Forwarded-*, X-Request-Id, our namespace."""

from __future__ import annotations

import asyncio

from tests.fixtures.gateway import basic_config


async def test_connection_cannot_remove_or_replace_the_gateways_headers(shared):
    gw, upstream = shared.gw, shared.up
    async with gw.session() as s:
        async with s.get(
            gw.url + "/h",
            headers={
                "Connection": "keep-alive, X-Request-Id, X-Forwarded-For, X-Custom, X-Portvakt-Consumer-Org",
                "X-Request-Id": "client-chosen-id",
                "X-Forwarded-For": "6.6.6.6",
                "X-Custom": "hop",
                "X-Kept": "end-to-end",
            },
        ) as r:
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
    seen = upstream.requests[-1]["headers"]
    # The gateway's own headers are there, exactly once, with the gateway's values.
    assert rid != "client-chosen-id"
    assert seen.getall("X-Request-Id") == [rid]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]
    # A header listed in Connection (and not the gateway's) is hop-by-hop: removed.
    assert "X-Custom" not in seen
    assert seen["X-Kept"] == "end-to-end"
    assert "Connection" not in seen or seen["Connection"].lower() in ("keep-alive", "close")
    # The identity forwarder's assertion is added after the filtering: Connection cannot drop it.
    assert any(k.lower().startswith("x-portvakt-") for k in seen.keys())


async def test_spoofed_forwarded_headers_from_an_untrusted_peer_are_replaced(shared):
    gw, upstream = shared.gw, shared.up
    async with gw.session() as s:
        async with s.get(
            gw.url + "/spoof",
            headers={
                "X-Forwarded-For": "203.0.113.9, 198.51.100.1",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "evil.example",
                "Forwarded": "for=203.0.113.9",
                "X-Request-Id": "spoofed",
                "X_Forwarded_For": "1.2.3.4",
                "X-Portvakt-Consumer-Org": "991825827",
                "X-PORTVAKT-Anything-Else": "x",
            },
        ) as r:
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
    seen = upstream.requests[-1]["headers"]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{gw.port}"
    assert "Forwarded" not in seen and "X_Forwarded_For" not in seen
    assert seen["X-Request-Id"] == rid != "spoofed"
    # Client copies of identity headers never pass (the chain verified no org here).
    assert "X-Portvakt-Consumer-Org" not in seen and "X-Portvakt-Anything-Else" not in seen
    await asyncio.sleep(0.1)
    [line] = [ln for ln in gw.access_log() if ln["request_id"] == rid]
    assert line["client_ip"] == "127.0.0.1"


async def test_trusted_proxy_chain_is_appended_and_request_id_kept(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url, trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"]))
    async with gw.session() as s:
        async with s.get(
            gw.url + "/via-lb",
            headers={
                # leftmost part is client-controlled; the rightmost untrusted hop is the client
                "X-Forwarded-For": "192.0.2.66, 203.0.113.7, 10.1.2.3",
                "X-Forwarded-Proto": "https",
                "X-Request-Id": "lb-request-1234",
            },
        ) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "lb-request-1234"
    seen = upstream.requests[-1]["headers"]
    assert seen["X-Forwarded-For"] == "192.0.2.66, 203.0.113.7, 10.1.2.3, 127.0.0.1"
    assert seen["X-Request-Id"] == "lb-request-1234"
    await asyncio.sleep(0.1)
    [line] = [ln for ln in gw.access_log() if ln["request_id"] == "lb-request-1234"]
    assert line["client_ip"] == "203.0.113.7"


async def test_hop_by_hop_response_headers_are_removed(shared):
    gw, upstream = shared.gw, shared.up
    upstream.response_headers = {
        "Connection": "X-Secret-Hop",
        "X-Secret-Hop": "1",
        "X-Ok": "yes",
        "X-Request-Id": "upstream-made",
    }
    async with gw.session() as s:
        async with s.get(gw.url + "/r") as r:
            assert r.status == 200
            assert r.headers["X-Ok"] == "yes"
            assert "X-Secret-Hop" not in r.headers
            assert r.headers.getall("X-Request-Id") == [upstream.requests[-1]["headers"]["X-Request-Id"]]


async def test_personal_number_in_path_is_masked_in_the_access_log(shared):
    gw = shared.gw
    async with gw.session() as s:
        async with s.get(gw.url + "/persons/01017012345/records?token=secret") as r:
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
    await asyncio.sleep(0.1)
    out = gw.output()
    assert "01017012345" not in out and "token=secret" not in out
    [line] = [ln for ln in gw.access_log() if ln["request_id"] == rid]
    assert line["path"] == "/persons/***********/records"


async def test_plain_http_listener_behind_a_trusted_load_balancer(start_gateway, upstream):
    gw = await start_gateway(
        basic_config(upstream.url, server={"plain_http": True}, trusted_proxies=["127.0.0.1/32"])
    )
    assert gw.url.startswith("http://")
    async with gw.session() as s:
        async with s.get(
            gw.url + "/lb",
            headers={
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "api.example",
                "X-Forwarded-For": "198.51.100.4",
            },
        ) as r:
            assert r.status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen["X-Forwarded-Proto"] == "https" and seen["X-Forwarded-Host"] == "api.example"
    assert seen["X-Forwarded-For"] == "198.51.100.4, 127.0.0.1"
