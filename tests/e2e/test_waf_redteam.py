"""Red-team findings on request bodies (notes/redteam F01-F04, F07) through the real gateway."""

import json
import socket
import ssl

import pytest

from tests.fixtures.gateway import basic_config


def _raw(port, ctx, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(data)
            out = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (TimeoutError, ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                out += chunk
    return out


@pytest.mark.parametrize("encoding", ["zstd", "br", "x-nope", "gzip, zstd"])
async def test_unsupported_content_encoding_is_a_problem_without_library_text(
    start_gateway, upstream, pki, encoding
):
    gw = await start_gateway(basic_config(upstream.url))
    data = _raw(
        gw.port,
        pki.client_ssl(),
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: " + encoding.encode() + b"\r\nContent-Length: 2\r\n\r\n{}",
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head.lower(), data[:300]
    assert b"backports" not in data and b"install" not in data.lower()
    doc = json.loads(body)
    assert doc["status"] == 415 and doc["reason"] == "unsupported_content_encoding"
    assert upstream.requests == []  # never passed on uninspected


async def _post(shared, body: bytes, headers: dict):
    async with shared.gw.session() as s:
        r = await s.post(shared.gw.url + "/api/docs", data=body, headers=headers)
        return r.status, await r.read()


SQLI = "1' UNION SELECT password FROM users--"


@pytest.mark.parametrize(
    "headers,body,status,reason",
    [
        ({"Content-Type": "application/vnd.api+json"}, json.dumps({"id": SQLI}).encode(), 403, "waf_blocked"),
        (
            {"Content-Type": "application/x-ndjson"},
            b'{"a": 1}\n' + json.dumps({"id": SQLI}).encode(),
            403,
            "waf_blocked",
        ),
        ({"Content-Type": "text/plain"}, json.dumps({"id": SQLI}).encode(), 403, "waf_blocked"),
        ({"Content-Type": "application/octet-stream"}, json.dumps({"id": SQLI}).encode(), 403, "waf_blocked"),
        (
            {"Content-Type": "application/json"},
            b'{"id": "' + SQLI.encode() + b'", "id": "1"}',
            403,
            "waf_blocked",
        ),
        (
            {"Content-Type": "application/xml"},
            b"<!DOCTYPE a SYSTEM 'http://127.0.0.1:9/evil.dtd'><a>&xxe;</a>",
            400,
            "waf_body_unparsable",
        ),
        (
            {"Content-Type": "application/x-www-form-urlencoded; charset=ibm037"},
            ("id=" + SQLI).encode("ibm037"),
            403,
            "waf_blocked",
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            __import__("gzip").compress(json.dumps({"id": SQLI}).encode()),
            403,
            "waf_blocked",
        ),
    ],
)
async def test_redteam_bodies_refused_before_upstream(shared, headers, body, status, reason):
    got, doc = await _post(shared, body, headers)
    assert got == status and json.loads(doc)["reason"] == reason
    assert shared.up.requests == []


async def test_benign_bodies_of_new_types_forwarded_as_sent(shared):
    import gzip

    body = gzip.compress(b'{"navn": "Kari"}')
    got, _ = await _post(shared, body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert got == 200 and shared.up.requests[-1]["body"] == body
    got, _ = await _post(shared, b"vanlig tekst", {"Content-Type": "text/plain"})
    assert got == 200 and shared.up.requests[-1]["body"] == b"vanlig tekst"
