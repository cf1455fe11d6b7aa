"""What aiohttp's HTTP parser refuses is still answered as problem+json, without echoing bytes."""

import json
import socket
import ssl

from tests.fixtures.gateway import basic_config


async def test_oversized_header_gets_a_problem_without_the_header_bytes(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url))
    secret = "hemmelig-" + "a" * 20000
    raw = (
        f"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nIntegrasjonPassord: {secret}\r\n\r\n"
    ).encode()
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
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), head[:200]
    assert b"server: portvakt" in head.lower()
    assert b"application/problem+json" in head.lower()
    assert b"x-request-id" in head.lower()
    doc = json.loads(body)
    assert doc["status"] == 400 and doc["reason"] == "bad_request"
    assert b"hemmelig" not in data
    assert "hemmelig" not in gw.output()
    assert upstream.requests == []
