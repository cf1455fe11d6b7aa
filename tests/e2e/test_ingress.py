"""Ingress over real sockets: request-smuggling shapes and path tricks sent verbatim over TLS,
size limits, method/host allow-lists, and CIDR rules on the client IP resolved through trusted
proxies. Each refused request must get its status and must not reach the upstream.

Many smuggling shapes are refused by aiohttp's HTTP parser before any handler runs (its plain-text
400, connection closed); the others reach the ingress filter (problem+json 400 with a reason id).
The table runs against both of aiohttp's parsers: the C one (llhttp, the default) and the pure
Python one (``AIOHTTP_NO_EXTENSIONS=1``), which lets more through, so the filter's own checks are
proven as the second line wherever a parser is lenient.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.fixtures.gateway import basic_config

H = b"Host: localhost\r\n"
HC = H + b"Connection: close\r\n"
SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"

# (id, raw request, ingress reason when the filter is the layer that refuses it)
SHAPES: list[tuple[str, bytes, str]] = [
    (
        "cl_then_te",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_then_cl",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "cl_differing_duplicates",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "request_smuggling",
    ),
    ("cl_list", b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!", "request_smuggling"),
    (
        "cl_plus_sign",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
        "request_smuggling",
    ),
    (
        "te_gzip_chunked",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_chunked_chunked",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_two_headers",
        b"POST /api/x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_chunked_gzip",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_identity",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_xchunked",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_space_before_colon",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_obs_fold",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_vertical_tab",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "te_in_http10",
        b"POST /api/x HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "chunk_size_0x",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        "request_smuggling",
    ),
    (
        "chunk_bare_lf",
        b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        "request_smuggling",
    ),
    ("path_nul_encoded", b"GET /api/a%00b HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
    ("path_encoded_slash", b"GET /api/..%2Fadmin HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
    ("path_encoded_backslash", b"GET /api/..%5cadmin HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
    ("path_backslash", b"GET /api/x\\..\\..\\admin HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
    ("path_invalid_utf8", b"GET /api/%C0%AF HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
    ("path_raw_non_utf8", b"GET /api/\xff HTTP/1.1\r\n" + HC + b"\r\n", "path_not_canonical"),
]

# Shapes both parsers let through, so the gateway itself (ingress filter, canonical path) is what
# refuses them (with its reason). (Dot segments are no refusal any more: they are resolved, and
# the request gets the route of its canonical path; see test_dot_segments_get_the_route_they_name.)
FILTER_LAYER = {
    "te_gzip_chunked",
    "path_nul_encoded",
    "path_encoded_slash",
    "path_encoded_backslash",
    "path_backslash",
    "path_invalid_utf8",
}


def _routes(upstream_url: str) -> dict:
    cfg = basic_config(upstream_url)
    cfg["routes"] = [
        {"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "demo"},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "upstream": "demo"},
    ]
    return cfg


async def _raw(gw, pki, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes verbatim over TLS; read until the gateway closes (or the timeout)."""
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    try:
        w.write(data)
        await w.drain()
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                while chunk := await r.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open>")
        return b"".join(chunks)
    finally:
        w.close()


def _status(resp: bytes) -> int:
    line = resp.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


def _problem(resp: bytes) -> dict | None:
    head, _, body = resp.partition(b"\r\n\r\n")
    if b"application/problem+json" not in head.lower():
        return None
    return json.loads(body.split(b"HTTP/1.")[0])


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_smuggling_shapes_and_path_tricks_get_400_and_reach_nothing(
    start_gateway, upstream, pki, parser
):
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else None
    gw = await start_gateway(_routes(upstream.url), env=env)
    failures = []
    by_filter = set()
    for name, data, reason in SHAPES:
        upstream.clear()
        # Behind each framing shape, a well-formed request pipelined on the same connection: had
        # the gateway misread where the first message ends, it would parse (and forward) it. A
        # malformed path is no framing problem, so there the connection may go on.
        framing = reason == "request_smuggling"
        resp = await _raw(gw, pki, data + SMUGGLED if framing else data)
        await asyncio.sleep(0.05)
        status, problem = _status(resp), _problem(resp)
        if status != 400:
            failures.append(f"{name}: status {status}: {resp[:120]!r}")
        if upstream.started or upstream.requests:
            failures.append(f"{name}: reached the upstream: {[r['raw_path'] for r in upstream.requests]}")
        answers = len(re.findall(rb"HTTP/1\.[01] \d{3} ", resp))
        if answers != 1:
            failures.append(f"{name}: {answers} responses on one connection")
        got = problem.get("reason") if problem is not None else None
        if got == reason:
            by_filter.add(name)
        elif not (name not in FILTER_LAYER and got == "bad_request"):  # a parser may say less
            failures.append(f"{name}: reason {got!r}, expected {reason!r}")
    assert not failures, "\n".join(failures)
    missing = FILTER_LAYER - by_filter
    assert not missing, f"expected the gateway (problem+json with its reason) to answer: {sorted(missing)}"

    # The same connection discipline does not break ordinary keep-alive pipelining.
    upstream.clear()
    ok = (
        b"GET /api/one HTTP/1.1\r\n" + H + b"\r\nGET /api/two HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    )
    resp = await _raw(gw, pki, ok)
    assert resp.count(b"HTTP/1.1 200") == 2
    assert [r["raw_path"] for r in upstream.requests] == ["/api/one", "/api/two"]
    denied = await gw.metric(
        "portvakt_requests_total", {"route": "(none)", "method": "GET", "status": "400", "decision": "deny"}
    )
    assert denied >= 4


@pytest.mark.parametrize("target", [b"/api/../admin", b"/api/%2e%2e/admin", b"/api/%2E./admin", b"//admin"])
async def test_dot_segments_get_the_route_they_name(start_gateway, upstream, pki, target):
    gw = await start_gateway(_routes(upstream.url))
    resp = await _raw(gw, pki, b"GET " + target + b" HTTP/1.1\r\n" + HC + b"\r\n")
    assert _status(resp) == 200
    assert [r["raw_path"] for r in upstream.requests] == ["/admin"]
    line = (await gw.access_lines(1, lambda e: e["status"] == 200))[-1]
    assert line["route"] == "admin" and line["path"] == "/admin"


async def test_limits_methods_and_hosts(start_gateway, upstream):
    cfg = _routes(upstream.url)
    cfg["routes"][0]["match"]["methods"] = ["GET", "POST"]
    cfg["ingress"] = {
        "max_uri_bytes": 300,
        "max_headers": 20,
        "max_header_bytes": 2000,
        "max_body_bytes": 1000,
        "allowed_hosts": ["127.0.0.1", "localhost"],
    }
    gw = await start_gateway(cfg)
    cases = [
        # (method, path, headers, body, status, reason)
        ("GET", "/api/ok", {}, None, 200, None),
        ("GET", "/api/" + "a" * 300, {}, None, 414, "uri_too_long"),
        ("GET", "/api/q?" + "b" * 300, {}, None, 414, "uri_too_long"),
        ("GET", "/api/h", {f"X-Extra-{i}": "1" for i in range(25)}, None, 431, "headers_too_large"),
        ("GET", "/api/h", {"X-Big": "v" * 2100}, None, 431, "headers_too_large"),
        ("POST", "/api/b", {"Content-Type": "application/json"}, b"x" * 1001, 413, "body_too_large"),
        ("POST", "/api/b", {"Content-Type": "application/json"}, b'"' + b"x" * 998 + b'"', 200, None),
        ("DELETE", "/api/m", {}, None, 405, "method_not_allowed"),
        ("GET", "/api/host", {"Host": "evil.example"}, None, 421, "host_not_allowed"),
        ("GET", "/api/host", {"Host": "LOCALHOST:8443"}, None, 200, None),
    ]
    async with gw.session() as s:
        for method, path, headers, body, status, reason in cases:
            upstream.clear()
            async with s.request(method, gw.url + path, headers=headers, data=body) as r:
                text = await r.text()
                assert r.status == status, (method, path[:40], r.status, text[:200])
                if reason is None:
                    assert len(upstream.requests) == 1
                    continue
                assert r.headers["Content-Type"].startswith("application/problem+json")
                assert (await r.json(content_type=None))["reason"] == reason
                assert upstream.started == 0, (method, path[:40])
                if status == 405:
                    assert r.headers["Allow"] == "GET, POST"


async def test_client_ip_rules_through_trusted_proxies(start_gateway, upstream):
    cfg = _routes(upstream.url)
    cfg["trusted_proxies"] = ["127.0.0.1/32"]
    cfg["ingress"] = {"deny_cidrs": ["203.0.113.0/24", "2001:db8::/32"]}
    gw = await start_gateway(cfg)

    async def status(xff: str | None) -> int:
        upstream.clear()
        headers = {"X-Forwarded-For": xff} if xff else {}
        async with gw.session() as s, s.get(gw.url + "/api/ip", headers=headers) as r:
            await r.read()
            if r.status != 200:
                assert upstream.started == 0
            return r.status

    # The peer 127.0.0.1 is a trusted proxy: the client is the address it names.
    assert await status("203.0.113.7") == 403
    assert await status("::ffff:203.0.113.7") == 403  # IPv4-mapped IPv6 is the IPv4 address
    assert await status("2001:db8::5") == 403
    assert await status("198.51.100.1") == 200
    assert await status("203.0.113.7, 198.51.100.1") == 200  # the proxy's own peer is the client
    assert await status(None) == 200

    # Without trusted proxies X-Forwarded-For is ignored: the TCP peer is the client.
    cfg["trusted_proxies"] = []
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert await status("203.0.113.7") == 200

    # allow_cidrs: only listed clients.
    cfg["ingress"] = {"allow_cidrs": ["10.0.0.0/8"]}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert await status(None) == 403
    cfg["ingress"] = {"allow_cidrs": ["10.0.0.0/8", "127.0.0.0/8"]}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert await status(None) == 200
    assert (
        await gw.metric(
            "portvakt_filter_decisions_total",
            {"filter": "ingress", "decision": "deny", "reason": "ip_not_in_allow_list"},
        )
        == 1
    )

    # mode: detect records the would-be denial and lets the request through.
    cfg["ingress"] = {"mode": "detect", "deny_cidrs": ["127.0.0.0/8"]}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert await status(None) == 200
    assert len(upstream.requests) == 1
    assert (
        await gw.metric(
            "portvakt_filter_decisions_total",
            {"filter": "ingress", "decision": "detect", "reason": "ip_in_deny_list"},
        )
        == 1
    )


async def test_body_limit_honours_ingress_mode(start_gateway, upstream):
    """The body limit lives in one place (filters/ingress.py BodyLimit) and honours ingress.mode:
    enforce answers 413 before the upstream is contacted, for a declared and for a streamed
    (chunked) body; detect forwards both and records ``ingress:body_too_large``."""
    cfg = _routes(upstream.url)
    cfg["ingress"] = {"max_body_bytes": 1000}
    cfg["waf"] = {"on_inspection_limit": "inspect_partial"}  # the WAF's own body limit aside
    gw = await start_gateway(cfg)

    async def chunks():
        for _ in range(3):
            yield b"y" * 600

    async def send(streamed: bool) -> tuple[int, dict]:
        upstream.clear()
        async with gw.session() as s:
            body = chunks() if streamed else b"x" * 1500
            async with s.post(gw.url + "/api/b", data=body) as r:
                return r.status, await r.json(content_type=None) if r.status != 200 else {}

    for streamed in (False, True):
        status, doc = await send(streamed)
        assert status == 413 and doc["reason"] == "body_too_large", (streamed, status, doc)
        if not streamed:  # refused on its Content-Length, before anything is read or forwarded
            assert not upstream.requests

    cfg["ingress"] = {"max_body_bytes": 1000, "mode": "detect"}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    for n, streamed in enumerate((False, True), start=1):
        status, doc = await send(streamed)
        assert status == 200, (streamed, doc)
        assert len(upstream.requests) == 1
        line = (await gw.access_lines(n, lambda e: e["status"] == 200))[-1]
        assert "ingress:body_too_large" in line.get("detections", []), line
    assert (
        await gw.metric(
            "portvakt_filter_decisions_total",
            {"filter": "ingress", "decision": "detect", "reason": "body_too_large"},
        )
        == 2
    )


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_unknown_and_disallowed_methods_get_405_counted_and_audited(
    start_gateway, upstream, pki, parser, tmp_path
):
    """``CUST`` is refused by aiohttp's C parser (llhttp) before any handler, by ingress with the
    Python parser; either way the answer is 405 method_not_allowed with Allow, counted and audited.
    ``ingress.allowed_methods`` narrows every route."""
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else None
    cfg = _routes(upstream.url)
    cfg["ingress"] = {"allowed_methods": ["GET", "POST", "OPTIONS"]}
    cfg["audit"] = {"path": str(tmp_path / "audit.jsonl"), "key": "e2e-audit-key-0123456789abcdef"}
    gw = await start_gateway(cfg, env=env)
    for line in (b"CUST /api/x HTTP/1.1", b"DELETE /api/x HTTP/1.1", b"FOO_BAR /api/x HTTP/1.1"):
        resp = await _raw(
            gw, pki, line + b"\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert _status(resp) == 405, (line, resp[:300])
        doc = _problem(resp)
        assert doc is not None and doc["reason"] == "method_not_allowed", resp[:300]
        head = resp.split(b"\r\n\r\n", 1)[0].lower()
        assert b"allow: get, post, options" in head
    assert upstream.started == 0
    text = await gw.metrics_text()
    assert 'method="OTHER"' in text and 'status="405"' in text
    assert await gw.stop_async() == 0
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if x.endswith("}")]
    refused = [r for r in records if r.get("type") == "request" and r.get("status") == 405]
    # the precise cause: unknown_method where the C parser refused the token, else the reason id
    assert len(refused) == 3 and {r["reason"] for r in refused} <= {"method_not_allowed", "unknown_method"}
    assert all(r["decision"] == "deny" for r in refused)
