"""Header trust at the edge, over raw sockets: what the upstream learns about the client, and
that no header byte is silently changed on the way.

- every ``X-Forwarded-For`` line is one list; the upstream and the audit agree on the client;
- ``X-Forwarded-Host`` / ``-Proto`` / ``-Port`` are the gateway's own view unless the peer is a
  trusted proxy (then its, i.e. the last, value);
- forwarded client-certificate headers from untrusted peers never reach the upstream (XFCC
  SANITIZE); the URL/method/IP override headers never do (strip list, configurable);
- header values pass byte for byte (UTF-8) or are refused (400 ``invalid_header_value``).
"""

from __future__ import annotations

import asyncio
import json
import re

from tests.fixtures.gateway import basic_config


async def send(gw, pki, head: bytes, tls: bool = True) -> tuple[int, bytes]:
    """One raw request (``head`` without the final blank line); (status, body)."""
    if tls:
        r, w = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
        )
    else:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        w.write(head + b"Connection: close\r\n\r\n")
        await w.drain()
        data = b""
        async with asyncio.timeout(20):
            while chunk := await r.read(65536):
                data += chunk
    finally:
        w.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(m.group(1)) if m else 0), data.partition(b"\r\n\r\n")[2]


FORGED = (
    b"X-Forwarded-For: 203.0.113.66\r\nX-Forwarded-For: 203.0.113.67\r\n"
    b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 1\r\n"
    b'X-Forwarded-Client-Cert: Hash=abc;Subject="CN=forged"\r\nClient-Cert: :Zm9yZ2Vk:\r\n'
    b"X-SSL-Client-Cert: forged\r\nssl-client-cert: forged\r\n"
    b"X-Original-URL: /innsyn/admin\r\nX-Rewrite-URL: /innsyn/admin\r\nX-HTTP-Method-Override: DELETE\r\n"
    b"X-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\nX-Real-IP: 10.0.0.1\r\nTrue-Client-IP: 10.0.0.2\r\n"
    b"X_Original_URL: /underscore\r\n"
)
NEVER = (
    "X-Forwarded-Client-Cert",
    "Client-Cert",
    "X-SSL-Client-Cert",
    "ssl-client-cert",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Real-IP",
    "True-Client-IP",
    "X_Original_URL",
)


async def test_untrusted_peer_gets_the_gateways_own_view_and_nothing_forged(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url))
    status, _ = await send(gw, pki, b"GET /x HTTP/1.1\r\nHost: API.Example.:443\r\n" + FORGED)
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen["X-Forwarded-Host"] == "api.example"  # canonical Host, not the forged one
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Port"] == str(gw.port)
    leaked = [n for n in NEVER if n in seen]
    assert not leaked, leaked


async def test_trusted_load_balancer_lines_form_one_list_and_its_values_count(
    start_gateway, upstream, pki, tmp_path
):
    cfg = basic_config(upstream.url, server={"plain_http": True}, trusted_proxies=["127.0.0.1/32"])
    cfg["audit"] = {"path": str(tmp_path / "audit.jsonl"), "key": "edge-headers-audit-key-0123456789"}
    gw = await start_gateway(cfg)
    # The client wrote the first line of each; the load balancer appended its own.
    status, _ = await send(
        gw,
        pki,
        (
            b"GET /lb HTTP/1.1\r\nHost: internal:8080\r\n"
            b"X-Forwarded-For: 203.0.113.66\r\nX-Forwarded-For: 198.51.100.4\r\n"
            b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Host: API.example.\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Port: 1\r\nX-Forwarded-Port: 443\r\n"
            b"X-Real-IP: 10.0.0.1\r\nX-Original-URL: /admin\r\n"
        ),
        tls=False,
    )
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen.getall("X-Forwarded-For") == ["203.0.113.66, 198.51.100.4, 127.0.0.1"]
    assert seen["X-Forwarded-Host"] == "api.example"
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Port"] == "443"
    assert "X-Real-IP" not in seen and "X-Original-URL" not in seen  # stripped from everyone
    # the audit and the access log name the same client the upstream's list ends with
    assert await gw.stop_async() == 0
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if x.endswith("}")]
    [req] = [r for r in recs if r.get("type") == "request"]
    assert req["client_ip"] == "198.51.100.4"
    assert gw.access_log()[-1]["client_ip"] == "198.51.100.4"


async def test_forwarded_client_certificate_passes_only_from_a_trusted_peer(start_gateway, upstream, pki):
    cfg = basic_config(upstream.url, server={"plain_http": True}, trusted_proxies=["127.0.0.1/32"])
    gw = await start_gateway(cfg)
    status, _ = await send(
        gw, pki, b"GET /t HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: Hash=abc\r\n", tls=False
    )
    assert status == 200 and upstream.requests[-1]["headers"]["X-Forwarded-Client-Cert"] == "Hash=abc"
    cfg["trusted_proxies"] = ["10.9.9.9/32"]
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    status, _ = await send(
        gw, pki, b"GET /t HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: Hash=abc\r\n", tls=False
    )
    assert status == 200 and "X-Forwarded-Client-Cert" not in upstream.requests[-1]["headers"]


async def test_strip_list_is_configurable(start_gateway, upstream, pki):
    gw = await start_gateway(
        basic_config(
            upstream.url,
            http={"strip_request_headers": ["X-Debug-Mode"], "forward_request_headers": ["X-Real-IP"]},
        )
    )
    status, _ = await send(
        gw,
        pki,
        b"GET /s HTTP/1.1\r\nHost: a\r\nX-Debug-Mode: 1\r\nX-Real-IP: 10.0.0.1\r\n"
        b"X-Rewrite-URL: /admin\r\nX-Kept: yes\r\n",
    )
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert "X-Debug-Mode" not in seen and "X-Rewrite-URL" not in seen
    assert seen["X-Real-IP"] == "10.0.0.1" and seen["X-Kept"] == "yes"


async def test_header_bytes_pass_verbatim_or_are_refused(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url))
    # Latin-1 bytes (not UTF-8): aiohttp would have forwarded "X-A: t". Refused instead.
    status, body = await send(gw, pki, b"GET /h HTTP/1.1\r\nHost: a\r\nX-A: \xe9t\xe9\r\n")
    assert status == 400 and json.loads(body)["reason"] == "invalid_header_value"
    assert upstream.requests == []
    # UTF-8 passes byte for byte.
    status, _ = await send(gw, pki, b"GET /h HTTP/1.1\r\nHost: a\r\nX-A: \xc3\xa9t\xc3\xa9 \xe2\x9c\x93\r\n")
    assert status == 200
    assert (
        upstream.requests[-1]["headers"]["X-A"].encode("utf-8", "surrogateescape")
        == b"\xc3\xa9t\xc3\xa9 \xe2\x9c\x93"
    )
    await asyncio.sleep(0.2)
    assert [e["reason"] for e in gw.access_log() if e["status"] == 400] == ["header_invalid_utf8"]


async def test_upstream_response_header_bytes_pass_verbatim_or_the_response_is_refused(start_gateway, pki):
    """A raw upstream answering with a Latin-1 header value: aiohttp would have sent the client
    'X-A: t'. Now 502 (upstream_header_invalid_utf8); a UTF-8 value passes byte for byte."""
    values = {b"/latin": b"\xe9t\xe9", b"/utf8": b"\xc3\xa9t\xc3\xa9"}

    async def serve(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            writer.write(
                b"HTTP/1.1 200 OK\r\nX-A: " + values.get(path, b"x") + b"\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\nok"
            )
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway(basic_config(f"http://127.0.0.1:{port}"))
        r, w = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
        )
        w.write(
            b"GET /latin HTTP/1.1\r\nHost: a\r\n\r\nGET /utf8 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        data = b""
        async with asyncio.timeout(20):
            while chunk := await r.read(65536):
                data += chunk
        w.close()
    finally:
        server.close()
    responses = re.split(rb"(?=HTTP/1\.1 \d{3} )", data)[1:]
    assert [x[9:12] for x in responses] == [b"502", b"200"], data[:500]
    assert b"upstream_unavailable" in responses[0]
    assert b"\r\nX-A: \xc3\xa9t\xc3\xa9\r\n" in responses[1]
    await asyncio.sleep(0.2)
    assert [e["reason"] for e in gw.access_log() if e["status"] == 502] == ["upstream_header_invalid_utf8"]


# Red team 2, F08: other proxies' client-certificate headers and authenticating proxies' user
# headers, in the spellings a backend moved from behind Traefik, an AWS ALB, Cloudflare,
# oauth2-proxy, Authelia, Azure EasyAuth or Google IAP may still read.
OTHER_PROXIES = (
    "X-Forwarded-Tls-Client-Cert",
    "X-Forwarded-Tls-Client-Cert-Info",
    "X-Amzn-Mtls-Clientcert",
    "X-Amzn-Mtls-Clientcert-Leaf",
    "X-Tls-Client-Cert",
    "Cf-Client-Cert",
    "Remote-User",
    "X-Remote-User",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Access-Token",
    "X-Auth-Request-User",
    "X-Ms-Client-Principal",
    "X-Goog-Authenticated-User-Email",
    "X-Amzn-Oidc-Identity",
    "X-Envoy-Internal",
    "X-Envoy-Original-Path",
    "Remote_User",
)


async def test_other_proxies_identity_headers_pass_only_from_a_trusted_peer(start_gateway, upstream, pki):
    forged = b"".join(f"{name}: forged-{i}\r\n".encode() for i, name in enumerate(OTHER_PROXIES))
    cfg = basic_config(upstream.url, server={"plain_http": True}, trusted_proxies=["10.9.9.9/32"])
    gw = await start_gateway(cfg)
    status, _ = await send(gw, pki, b"GET /t HTTP/1.1\r\nHost: a\r\n" + forged, tls=False)
    assert status == 200
    seen = {k.lower(): v for k, v in upstream.requests[-1]["headers"].items()}
    leaked = [n for n in OTHER_PROXIES if n.lower() in seen or n.lower().replace("_", "-") in seen]
    assert not leaked, leaked
    # from a trusted proxy (the operator's own auth proxy in front) they pass as sent
    cfg["trusted_proxies"] = ["127.0.0.1/32"]
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    status, _ = await send(gw, pki, b"GET /t HTTP/1.1\r\nHost: a\r\nRemote-User: alice\r\n", tls=False)
    assert status == 200 and upstream.requests[-1]["headers"]["Remote-User"] == "alice"
