"""The proxy end to end: real TLS listener, real upstream, real subprocess gateway."""

from __future__ import annotations

import asyncio
import json
import ssl
import warnings

import aiohttp

from tests.fixtures.gateway import basic_config


async def test_request_reaches_upstream_over_tls_with_request_id(shared):
    gw, upstream = shared.gw, shared.up
    async with gw.session() as s:
        async with s.post(
            gw.url + "/hello/world?x=1&y=2", data=b'{"a":1}', headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
            rid = r.headers["X-Request-Id"]
            doc = json.loads(await r.read())
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert doc["method"] == "POST" and doc["path"] == "/hello/world" and doc["query"] == "x=1&y=2"
    assert doc["body"] == '{"a":1}'
    [seen] = upstream.requests
    assert seen["headers"]["X-Request-Id"] == rid
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["X-Forwarded-Proto"] == "https"
    assert seen["headers"]["X-Forwarded-Host"] == f"127.0.0.1:{gw.port}"
    assert seen["body"] == b'{"a":1}'
    # One access-log line, without the query string.
    await asyncio.sleep(0.1)
    lines = [ln for ln in gw.access_log() if ln["request_id"] == rid]
    assert len(lines) == 1
    line = lines[0]
    assert line["path"] == "/hello/world" and line["status"] == 200 and line["decision"] == "allow"
    assert line["route"] == "demo" and line["client_ip"] == "127.0.0.1" and line["bytes_in"] == 7
    assert "x=1" not in json.dumps(line)


async def test_upstream_down_is_502_problem(shared):
    gw = shared.gw  # route "down" points at a port nothing listens on
    async with gw.session() as s:
        async with s.get(gw.url + "/down/x") as r:
            assert r.status == 502
            assert r.headers["Content-Type"] == "application/problem+json"
            assert r.headers["Server"] == "portvakt"
            doc = await r.json(content_type=None)
    assert doc["reason"] == "upstream_unavailable" and doc["status"] == 502
    assert doc["type"].endswith("/upstream_unavailable") and doc["request_id"] == r.headers["X-Request-Id"]


async def test_upstream_slow_is_504_problem(shared):
    gw, upstream = shared.gw, shared.up  # timeout_seconds: 1
    upstream.delay = 2
    async with gw.session() as s:
        async with s.get(gw.url + "/slow") as r:
            assert r.status == 504
            doc = await r.json(content_type=None)
    assert doc["reason"] == "upstream_timeout"


async def test_body_over_limit_with_content_length_is_413_and_upstream_sees_nothing(shared):
    gw, upstream = shared.gw, shared.up  # ingress.max_body_bytes: 1000
    async with gw.session() as s:
        async with s.post(gw.url + "/upload", data=b"a" * 1001) as r:
            assert r.status == 413
            doc = await r.json(content_type=None)
        assert doc["reason"] == "body_too_large"
        async with s.post(gw.url + "/upload", data=b"a" * 1000) as r:  # exactly the limit passes
            assert r.status == 200
    assert [q["body"] for q in upstream.requests] == [b"a" * 1000]


async def test_chunked_body_over_limit_is_413_and_upstream_sees_nothing(shared):
    gw, upstream = shared.gw, shared.up  # ingress.max_body_bytes: 1000

    async def chunks(total: int):
        for _ in range(total // 100):
            yield b"b" * 100

    async with gw.session() as s:
        async with s.post(gw.url + "/upload", data=chunks(5000)) as r:
            assert r.status == 413
            doc = await r.json(content_type=None)
    assert doc["reason"] == "body_too_large"
    assert upstream.started == 0 and upstream.requests == []
    async with gw.session() as s:  # a chunked body within the limit streams through
        async with s.post(gw.url + "/upload", data=chunks(900)) as r:
            assert r.status == 200
    assert upstream.requests[-1]["body"] == b"b" * 900


async def test_no_route_is_a_404_problem_and_a_large_chunked_body_is_cut_off_at_the_limit(
    start_gateway, upstream
):
    # Limit above the 64 KiB prefix: the excess is found while streaming to the upstream. The WAF
    # refuses bodies over its inspection limit (128 KiB) by default; here it inspects the prefix
    # and lets the rest stream (the explicit opt-in).
    cfg = basic_config(
        upstream.url, ingress={"max_body_bytes": 200_000}, waf={"on_inspection_limit": "inspect_partial"}
    )
    cfg["routes"][0]["match"] = {"path_prefix": "/upload"}
    gw = await start_gateway(cfg)
    async with gw.session() as s:
        async with s.get(gw.url + "/other") as r:
            assert r.status == 404
            assert r.headers["Content-Type"] == "application/problem+json"
            doc = await r.json(content_type=None)
    assert doc["reason"] == "no_route" and doc["request_id"] == r.headers["X-Request-Id"]
    assert upstream.started == 0

    async def chunks(total: int):
        for _ in range(total // 10_000):
            yield b"c" * 10_000

    async with gw.session() as s:
        async with s.post(gw.url + "/upload", data=chunks(400_000)) as r:
            assert r.status == 413
        async with s.post(gw.url + "/upload", data=chunks(150_000)) as r:
            assert r.status == 200
    # The oversize body never completed at the upstream; the one within the limit did, whole.
    assert [len(q["body"]) for q in upstream.requests] == [150_000]


async def test_large_response_is_streamed_back_whole(shared):
    gw = shared.gw
    async with gw.session() as s:
        async with s.get(gw.url + "/big?size=1000000") as r:
            assert r.status == 200
            body = await r.read()
    assert len(body) == 1_000_000 and set(body) == {ord("x")}


async def test_sse_events_arrive_incrementally(shared):
    gw = shared.gw
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, bytes]] = []
    async with gw.session() as s:
        async with s.get(gw.url + "/sse?n=4&interval=0.3") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            t0 = loop.time()
            async for chunk in r.content.iter_any():
                arrivals.append((loop.time() - t0, chunk))
    data = b"".join(c for _, c in arrivals)
    assert data == b"".join(f"data: event {i}\n\n".encode() for i in range(4))
    # Each event arrives on its own, well before the stream ends (not buffered until the end).
    first_event_at = next(t for t, c in arrivals if b"event 0" in c)
    last_event_at = next(t for t, c in arrivals if b"event 3" in c)
    assert len(arrivals) >= 3
    assert last_event_at - first_event_at >= 0.5


async def test_client_disconnect_cancels_the_upstream_call(shared):
    gw, upstream = shared.gw, shared.up
    upstream.delay = 3
    async with gw.session() as s:
        try:
            async with s.get(gw.url + "/hang", timeout=aiohttp.ClientTimeout(total=0.5)):
                pass
        except TimeoutError:
            pass
    # The gateway saw its client go away and dropped the upstream connection: the upstream's
    # handler is cancelled long before its 3 s delay ends.
    for _ in range(40):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.05)
    assert upstream.started == 1 and upstream.cancelled == 1


async def test_connect_and_foreign_absolute_form_are_refused(shared):
    gw, upstream = shared.gw, shared.up
    ctx = gw.ssl_context()

    async def raw(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost"
        )
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        return data

    resp = await raw(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n"
    )
    assert resp.startswith(b"HTTP/1.1 400")
    resp = await raw(b"GET http://example.com/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    assert upstream.started == 0
    # An absolute-form target naming the Host it is sent with is read as its path (RFC 9112 3.2.2),
    # exactly like the origin-form request would be.
    resp = await raw(
        f"GET https://127.0.0.1:{gw.port}/same?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nConnection: close\r\n\r\n".encode()
    )
    assert resp.startswith(b"HTTP/1.1 200")
    assert upstream.requests[-1]["raw_path"] == "/same?q=1"


async def test_h2c_upgrade_is_never_forwarded(shared):
    gw, upstream = shared.gw, shared.up
    async with gw.session() as s:
        async with s.get(
            gw.url + "/u",
            headers={
                "Upgrade": "h2c",
                "Connection": "Upgrade, HTTP2-Settings",
                "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
            },
        ) as r:
            assert r.status == 200
    seen = upstream.requests[-1]["headers"]
    assert "Upgrade" not in seen and "HTTP2-Settings" not in seen


async def test_https_client_without_tls_cannot_talk_plain_http(shared):
    gw, upstream = shared.gw, shared.up
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(f"http://127.0.0.1:{gw.port}/x") as r:
                assert r.status == 400
        except aiohttp.ClientError:
            pass
    assert upstream.started == 0
    # TLS 1.1 is refused.
    ctx = gw.ssl_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    try:
        await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost")
        raise AssertionError("TLS 1.1 handshake succeeded")
    except (ssl.SSLError, ConnectionResetError):
        pass


async def test_expect_100_continue_is_answered_before_the_body_is_sent(shared):
    gw, upstream = shared.gw, shared.up
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ssl_context(), server_hostname="localhost"
    )
    writer.write(
        b"POST /expect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.requests[-1]["body"] == b"hello"
    assert "Expect" not in upstream.requests[-1]["headers"]
