"""What aiohttp's HTTP parser refuses is still answered as problem+json, without echoing bytes."""

import asyncio
import json
import re
import socket
import ssl

from tests.fixtures.gateway import basic_config, parse_metrics


async def test_oversized_header_gets_a_problem_without_the_header_bytes(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url))
    secret = "hemmelig-" + "a" * 20000
    raw = (f"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nIntegrasjonPassord: {secret}\r\n\r\n").encode()
    ctx = pki.client_ssl()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(raw)
            data = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 431", b"HTTP/1.0 431")), head[:200]
    assert b"server: portvakt" in head.lower()
    assert b"application/problem+json" in head.lower()
    assert b"x-request-id" in head.lower()
    doc = json.loads(body)
    assert doc["status"] == 431 and doc["reason"] == "headers_too_large"
    assert b"hemmelig" not in data
    assert "hemmelig" not in gw.output()
    assert upstream.requests == []


# What the parser (or the version check right after it) refuses, with the documented status, the
# public reason and the precise internal reason that the access log, the audit record and the
# metrics carry.
HOST = b"Host: localhost\r\n"
REFUSALS = [
    (
        "te_and_cl",
        b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "request_smuggling",
        "te_and_cl",
    ),
    (
        "cl_and_te",
        b"POST /x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        400,
        "request_smuggling",
        "te_and_cl",
    ),
    (
        "duplicate_cl",
        b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
        "request_smuggling",
        "duplicate_content_length",
    ),
    (
        "obs_fold",
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: b\r\n c\r\n\r\n",
        400,
        "request_smuggling",
        "obs_fold",
    ),
    (
        "chunk_overflow",
        b"POST /x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nabc",
        400,
        "request_smuggling",
        "bad_chunk_size",
    ),
    (
        "uri_too_long",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        414,
        "uri_too_long",
        "request_line_too_long",
    ),
    (
        "header_too_long",
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: " + b"a" * 17000 + b"\r\n\r\n",
        431,
        "headers_too_large",
        "header_line_too_long",
    ),
    (
        "too_many_headers",
        b"GET /x HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: a\r\n" % i for i in range(250)) + b"\r\n",
        431,
        "headers_too_large",
        "too_many_headers",
    ),
    (
        "raw_non_ascii_target",
        b"GET /a\xe9b HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
        "path_not_canonical",
        "invalid_target",
    ),
    (
        "duplicate_host",
        b"GET /x HTTP/1.1\r\n" + HOST + b"Host: other\r\n\r\n",
        400,
        "host_not_canonical",
        "duplicate_host",
    ),
    ("missing_host", b"GET /x HTTP/1.1\r\n\r\n", 400, "host_not_canonical", "missing_host"),
    ("http_0_9", b"GET /c\r\n\r\n", 505, "http_version_not_supported", "http_version"),
    (
        "http_2_0_text",
        b"GET /c HTTP/2.0\r\n" + HOST + b"\r\n",
        505,
        "http_version_not_supported",
        "http_version",
    ),
]


async def _exchange(gw, pki, raw: bytes) -> bytes:
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    try:
        w.write(raw)
        await w.drain()
        data = b""
        try:
            async with asyncio.timeout(20):
                while chunk := await r.read(65536):
                    data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return data
    finally:
        w.close()


async def test_every_parser_refusal_leaves_its_record(start_gateway, upstream, pki, tmp_path):
    cfg = basic_config(upstream.url)
    cfg["audit"] = {"path": str(tmp_path / "audit.jsonl"), "key": "parser-errors-audit-key-0123456789"}
    gw = await start_gateway(cfg)
    before = parse_metrics(await gw.metrics_text())
    failures, rids = [], {}
    for name, raw, status, reason, internal in REFUSALS:
        data = await _exchange(gw, pki, raw)
        head, _, body = data.partition(b"\r\n\r\n")
        m = re.match(rb"HTTP/\d\.\d (\d{3})", head)
        got = int(m.group(1)) if m else 0
        doc = json.loads(body) if b"problem+json" in head.lower() else {}
        if (got, doc.get("reason")) != (status, reason):
            failures.append(
                f"{name}: {got} {doc.get('reason')!r}, expected {status} {reason!r}: {data[:150]!r}"
            )
        if len(re.findall(rb"HTTP/\d\.\d \d{3} ", data)) != 1:
            failures.append(f"{name}: not exactly one response")
        rids[doc.get("request_id")] = (name, status, internal)
    assert not failures, "\n".join(failures)
    assert upstream.started == 0 and upstream.requests == []

    await asyncio.sleep(0.3)
    lines = {e["request_id"]: e for e in gw.access_log()}
    for rid, (name, status, internal) in rids.items():
        assert rid in lines, f"{name}: no access-log line"
        assert (lines[rid]["status"], lines[rid]["reason"], lines[rid]["decision"]) == (
            status,
            internal,
            "deny",
        ), name
    after = parse_metrics(await gw.metrics_text())
    for status in {s for _, _, s, _, _ in REFUSALS}:
        counted = sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k[0] == "portvakt_requests_total" and dict(k[1]).get("status") == str(status)
        )
        assert counted == sum(1 for r in REFUSALS if r[2] == status), status
    assert await gw.stop_async() == 0
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if x.endswith("}")]
    audited = {r["request_id"]: r for r in recs if r.get("type") == "request"}
    for rid, (name, status, internal) in rids.items():
        assert rid in audited, f"{name}: no audit record"
        assert (audited[rid]["status"], audited[rid]["reason"]) == (status, internal), name
    assert "aaaaaaaaaaaaaaaa" not in gw.output()  # no offending bytes echoed into the logs


async def test_http_0_9_request_line_alone_is_never_forwarded(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url))
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    w.write(b"GET /c\r\n")
    await w.drain()
    await asyncio.sleep(0.5)
    try:
        w.write_eof()
    except (OSError, NotImplementedError):
        pass
    data = b""
    try:  # llhttp may wait for more; whatever happens, nothing is answered 200 or forwarded
        async with asyncio.timeout(3):
            while chunk := await r.read(65536):
                data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    w.close()
    assert b" 200 " not in data
    assert upstream.started == 0


CHUNKED = b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"


async def test_out_of_range_chunk_sizes_are_refused_before_anything_is_forwarded(
    start_gateway, upstream, pki
):
    gw = await start_gateway(basic_config(upstream.url, ingress={"max_body_bytes": 100000}))
    cases = [
        ("2^64-1", CHUNKED + b"ffffffffffffffff\r\n" + b"a" * 70000),
        ("over_the_body_limit", CHUNKED + b"186a1\r\n" + b"a" * 70000),  # 100001
        ("second_chunk", CHUNKED + b"3\r\nabc\r\nFFFFFFFFFFFF;x=y\r\n" + b"a" * 70000),
        (
            "pipelined_behind_a_get",
            b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n" + CHUNKED + b"ffffffffff\r\n" + b"a" * 70000,
        ),
    ]
    for name, raw in cases:
        upstream.clear()
        data = await _exchange(gw, pki, raw)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
        want = [b"200", b"400"] if name.startswith("pipelined") else [b"400"]
        assert statuses == want, (name, data[:300])
        doc = json.loads(data.rpartition(b"\r\n\r\n")[2])
        assert doc["reason"] == "request_smuggling", name
        assert [r["path"] for r in upstream.requests] == (
            ["/first"] if name.startswith("pipelined") else []
        ), name
        assert upstream.started == len(upstream.requests), name  # nothing half-sent either
    await asyncio.sleep(0.3)
    refused = [e for e in gw.access_log() if e["status"] == 400]
    assert [e["reason"] for e in refused] == ["chunk_size_out_of_range"] * 4

    # Chunked bodies within range still pass, whatever their chunking.
    upstream.clear()
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"b" * n) for n in (1, 4096, 65536, 30000)) + b"0\r\n\r\n"
    data = await _exchange(gw, pki, CHUNKED.replace(HOST, HOST + b"Connection: close\r\n") + body)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert upstream.requests[-1]["body"] == b"b" * (1 + 4096 + 65536 + 30000)


async def test_a_connection_the_chunk_guard_cannot_follow_ends_after_its_request(
    start_gateway, upstream, pki
):
    """An oversized header block arriving in pieces (the ingress answers 431) makes the guard give
    up following the framing: then the connection ends after that request, and nothing
    pipelined behind it (here: a 2^64-1 chunk) is served."""
    gw = await start_gateway(basic_config(upstream.url))
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    w.write(b"GET /big HTTP/1.1\r\n" + HOST)
    for i in range(5):  # 75 KB of legal header lines, in separate reads
        w.write(b"X-Pad-%d: %s\r\n" % (i, b"p" * 15000))
        await w.drain()
        await asyncio.sleep(0.1)
    w.write(b"\r\n" + CHUNKED + b"ffffffffffffffff\r\n" + b"a" * 70000)
    data = b""
    try:
        await w.drain()
        async with asyncio.timeout(20):
            while chunk := await r.read(65536):
                data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    finally:
        w.close()
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"431"], data[:300]
    assert upstream.started == 0


async def test_pipelined_mixed_traffic_passes_the_chunk_guard_untouched(start_gateway, upstream, pki):
    """Legitimate keep-alive traffic (GETs, Content-Length and chunked bodies whose bytes look like
    chunk sizes and request lines), written in random pieces: every request is served, every body
    arrives intact. The guard must never raise a false alarm."""
    import random

    rnd = random.Random(7)
    noise = [b"ffffffffffffffff\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n", b"x" * 50]
    stream, bodies = b"", []
    for i in range(24):
        kind = i % 3
        body = b"".join(rnd.choice(noise) for _ in range(rnd.randint(1, 30)))
        if kind == 0:
            stream += b"GET /g%d HTTP/1.1\r\n" % i + HOST + b"\r\n"
            bodies.append(b"")
        elif kind == 1:
            stream += b"POST /c%d HTTP/1.1\r\n" % i + HOST + b"Content-Length: %d\r\n\r\n" % len(body) + body
            bodies.append(body)
        else:
            stream += b"POST /t%d HTTP/1.1\r\n" % i + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
            for pos in range(0, len(body), 37):
                part = body[pos : pos + 37]
                stream += b"%x;a=b\r\n%s\r\n" % (len(part), part)
            stream += b"0\r\n\r\n"
            bodies.append(body)
    stream += b"GET /last HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    gw = await start_gateway(basic_config(upstream.url))
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 700)
        w.write(stream[pos : pos + step])
        pos += step
        if rnd.random() < 0.3:
            await w.drain()
            await asyncio.sleep(0.01)
    data = b""
    async with asyncio.timeout(60):
        while chunk := await r.read(65536):
            data += chunk
    w.close()
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"200"] * 25
    assert [q["body"] for q in upstream.requests[:24]] == bodies


async def test_parser_refusals_are_counted_under_the_supervisor_too(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url), workers=2, wait_ready=False)
    await gw.wait_ready(timeout=90)  # two workers start slowly on a loaded machine
    before = await gw.metric(
        "portvakt_requests_total", {"route": "(none)", "method": "OTHER", "status": "400", "decision": "deny"}
    )
    for _ in range(4):
        data = await _exchange(gw, pki, REFUSALS[0][1])
        assert data.startswith(b"HTTP/1.0 400") and b"request_smuggling" in data, data[:200]
    after = await gw.metric(
        "portvakt_requests_total", {"route": "(none)", "method": "OTHER", "status": "400", "decision": "deny"}
    )
    assert after - before == 4
    await asyncio.sleep(0.3)
    assert sum(1 for e in gw.access_log() if e["reason"] == "te_and_cl") == 4
