"""Red team 2, F05: an upstream answer that aiohttp's client parser refuses (TE + CL, a bare CR in a
header, an over-long header) is a 502 for the client and one log line for the operator. That line
must not carry the client's query string (tokens, passwords, OAuth codes) nor the parser's excerpt
of the upstream's bytes (a session cookie)."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.gateway import basic_config

SECRETS = ("SECRET-ACCESS-TOKEN", "hemmelig", "OAUTH-CODE", "SESSION-SECRET", "eyJSECRET", "SECRET-API-KEY")

ANSWERS = {
    b"/tecl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"/badheader": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: sid=SESSION-SECRET-abc; Path=/\rX: y\r\n\r\nok",
    b"/bighdr": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: token=eyJSECRET"
    + b"A" * 9000
    + b"\r\n\r\nok",
    b"/badstatus": b"HTTP/1.1 2OO SECRET-API-KEY\r\nContent-Length: 0\r\n\r\n",
}


@pytest.fixture
async def faulty_upstream():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].split(b"?", 1)[0]
            writer.write(ANSWERS.get(path, ANSWERS[b"/tecl"]))
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


async def test_refused_upstream_answers_log_no_query_and_no_upstream_bytes(start_gateway, faulty_upstream):
    gw = await start_gateway(basic_config(faulty_upstream))
    async with gw.session() as s:
        for path in (
            "/tecl?access_token=SECRET-ACCESS-TOKEN&IntegrasjonPassord=hemmelig&code=OAUTH-CODE",
            "/badheader?x=1",
            "/bighdr?apikey=SECRET-API-KEY",
            "/badstatus?q=1",
        ):
            async with s.get(gw.url + path) as r:
                assert r.status == 502, path
                body = await r.text()
                assert not any(secret in body for secret in SECRETS), body
    await asyncio.sleep(0.3)
    log = gw.output()
    lines = [line for line in log.splitlines() if "unavailable" in line]
    assert len(lines) >= 4, log[-2000:]
    for secret in SECRETS:
        assert secret not in log, f"{secret} in the gateway log"
    assert "url=" not in log
    # the operator still learns what kind of fault it was
    assert any("Transfer-Encoding" in line or "ClientResponseError" in line for line in lines), lines
