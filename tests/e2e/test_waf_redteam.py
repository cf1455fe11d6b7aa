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
                except (ssl.SSLError, ConnectionResetError, socket.timeout):
                    break
                if not chunk:
                    break
                out += chunk
    return out


@pytest.mark.parametrize("encoding", ["zstd", "br", "x-nope", "gzip, zstd"])
async def test_unsupported_content_encoding_is_a_problem_without_library_text(start_gateway, upstream, pki, encoding):
    gw = await start_gateway(basic_config(upstream.url))
    data = _raw(gw.port, pki.client_ssl(),
                b"POST /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
                b"Content-Encoding: " + encoding.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head.lower(), data[:300]
    assert b"backports" not in data and b"install" not in data.lower()
    doc = json.loads(body)
    assert doc["status"] == 415 and doc["reason"] == "unsupported_content_encoding"
    assert upstream.requests == []  # never passed on uninspected
