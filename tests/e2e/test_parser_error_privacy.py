"""A request aiohttp cannot parse must not put the offending header bytes (a token, an
IntegrasjonPassord, a fødselsnummer) into the gateway's log."""

from __future__ import annotations

import asyncio


async def _raw(gw, pki, data: bytes) -> bytes:
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    try:
        w.write(data)
        await w.drain()
        chunks = []
        try:
            async with asyncio.timeout(5):
                while chunk := await r.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        w.close()


async def test_oversized_header_values_do_not_reach_the_log(shared, pki):
    gw = shared.gw
    secrets = [
        b"IntegrasjonPassord: hemmelig-passord-24917397852",
        b"Authorization: Bearer eyJSECRETTOKENPART",
    ]
    for line in secrets:
        resp = await _raw(
            gw, pki, b"GET / HTTP/1.1\r\nHost: localhost\r\n" + line + b"x" * 20000 + b"\r\n\r\n"
        )
        assert resp.split(b" ", 2)[1] == b"431", resp[:200]  # headers_too_large
    for _ in range(50):  # the log line is written asynchronously
        out = gw.output()
        if out.count("bad HTTP request from") >= len(secrets):
            break
        await asyncio.sleep(0.1)
    out = gw.output()
    assert out.count("bad HTTP request from") >= len(secrets), out[-2000:]
    for word in ("hemmelig-passord", "24917397852", "SECRETTOKENPART", "xxxxxxxxxx"):
        assert word not in out, word
