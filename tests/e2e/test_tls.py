"""TLS at the public listener: mTLS modes, the verified peer chain, reload of certificates and CAs."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import tlsutil
from gateway.config import TLSConfig
from gateway.dev import ca as devca
from tests.fixtures.gateway import basic_config
from tests.fixtures.upstream import free_port


def tls_section(
    pki, mode: str, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> dict:
    return {
        "certificate": cert or pki.server_cert,
        "private_key": key or pki.server_key,
        "client_ca": ca or pki.ca_cert,
        "client_certificate": mode,
    }


async def _served_cert(gw, ctx: ssl.SSLContext) -> x509.Certificate:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


async def test_mtls_required_rejects_no_client_cert_and_accepts_the_dev_client_cert(
    start_gateway, upstream, pki
):
    cfg = basic_config(upstream.url, server={"tls": tls_section(pki, "required")})
    gw = await start_gateway(cfg)
    # Without a client certificate: the handshake (TLS 1.3: the first read after it) fails.
    async with gw.session() as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
            async with s.get(gw.url + "/no-cert") as r:
                await r.read()
    # A certificate from a CA the gateway does not trust fails too.
    ucert, ukey = pki.untrusted_client_cert("991825827")
    async with gw.session(ucert, ukey) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
            async with s.get(gw.url + "/untrusted") as r:
                await r.read()
    assert upstream.started == 0
    # The dev client certificate (SEID 2, org 991825827) is accepted, and its verified chain
    # reached the policy stages: the certificates stage read the org number from it.
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:
        async with s.get(gw.url + "/with-cert") as r:
            assert r.status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen.get("X-Portvakt-Certificate-Org") == "991825827"


async def test_mtls_optional_admits_both(start_gateway, upstream, pki):
    gw = await start_gateway(basic_config(upstream.url, server={"tls": tls_section(pki, "optional")}))
    async with gw.session() as s:
        async with s.get(gw.url + "/anon") as r:
            assert r.status == 200
    assert "X-Portvakt-Certificate-Org" not in upstream.requests[-1]["headers"]
    async with gw.session(pki.client_seid1_cert, pki.client_seid1_key) as s:
        async with s.get(gw.url + "/seid1") as r:
            assert r.status == 200
    assert upstream.requests[-1]["headers"].get("X-Portvakt-Certificate-Org") == "958935420"


async def test_peer_chain_is_the_verified_chain_leaf_first(pki):
    """In-process listener with tlsutil: a handler sees ctx.tls facts for the presented cert."""
    tls = tlsutil.ReloadableTLS(
        TLSConfig(
            certificate=pki.server_cert,
            private_key=pki.server_key,
            client_ca=pki.ca_cert,
            client_certificate="optional",
        ),
        lambda p: p,
    )
    seen: list = []

    async def handler(request: web.BaseRequest) -> web.Response:
        seen.append(tlsutil.peer_info(request.transport))
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls.front).start()
    try:
        conn = aiohttp.TCPConnector(ssl=pki.client_ssl(pki.client_seid2_cert, pki.client_seid2_key))
        async with aiohttp.ClientSession(connector=conn) as s:
            for _ in range(2):  # the second request on the same connection reuses the cached facts
                async with s.get(f"https://127.0.0.1:{port}/") as r:
                    assert r.status == 200
    finally:
        await runner.cleanup()
    info = seen[0]
    assert seen[1] is info
    assert info.version in ("TLSv1.3", "TLSv1.2") and info.cipher
    leaf_pem = Path(pki.client_seid2_cert).read_bytes()
    leaf_der = x509.load_pem_x509_certificate(leaf_pem).public_bytes(serialization.Encoding.DER)
    ca_der = x509.load_pem_x509_certificate(Path(pki.ca_cert).read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert info.peer_chain_der[0] == leaf_der
    assert info.peer_chain_der[-1] == ca_der and len(info.peer_chain_der) == 2


def test_weak_protocols_and_ciphers_are_off(pki):
    tls = TLSConfig(certificate=pki.server_cert, private_key=pki.server_key)
    ctx = tlsutil.build_context(tls, lambda p: p)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    names = [c["name"] for c in ctx.get_ciphers()]
    assert names and all(
        "CBC" not in n and "RC4" not in n and "3DES" not in n and "NULL" not in n for n in names
    )
    assert all(c["protocol"] == "TLSv1.3" or "ECDHE" in c["name"] for c in ctx.get_ciphers())
    assert not ctx.options & ssl.OP_NO_TICKET
    with pytest.raises(ValueError, match="cannot load certificate"):
        tlsutil.build_context(
            TLSConfig(certificate="/nonexistent.pem", private_key=pki.server_key), lambda p: p
        )


async def test_sighup_reloads_the_server_certificate_and_the_client_ca(
    start_gateway, upstream, pki, tmp_path
):
    cfg = basic_config(upstream.url, server={"tls": tls_section(pki, "required")})
    gw = await start_gateway(cfg)
    client = pki.client_ssl(pki.client_seid2_cert, pki.client_seid2_key)
    before = await _served_cert(gw, client)

    # A new server certificate from the same CA, and a client CA bundle of another CA only.
    ca = devca.CertificateAuthority.load(Path(pki.ca_cert), Path(pki.ca_key))
    cert, key = ca.server_certificate()
    cert_path, key_path = tmp_path / "server2.pem", tmp_path / "server2-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ucert, ukey = pki.untrusted_client_cert("991825827")
    other_ca = str(Path(pki.dir) / "untrusted-ca" / "ca.pem")

    # Keep one connection open across the reload: it stays on the old context.
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as kept:
        async with kept.get(gw.url + "/before") as r:
            assert r.status == 200
        gw.write_config(
            basic_config(
                upstream.url,
                server={
                    "tls": tls_section(pki, "required", ca=other_ca, cert=str(cert_path), key=str(key_path))
                },
            )
        )
        assert await gw.reload() == "success"
        async with kept.get(gw.url + "/kept-alive") as r:
            assert r.status == 200

    after = await _served_cert(gw, pki.client_ssl(ucert, ukey))
    assert after.serial_number == cert.serial_number != before.serial_number
    # The old client CA is no longer trusted; the new one is.
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
            async with s.get(gw.url + "/old-ca") as r:
                await r.read()
    async with gw.session(ucert, ukey) as s:
        async with s.get(gw.url + "/new-ca") as r:
            assert r.status == 200


async def test_broken_certificate_on_reload_keeps_the_old_one(start_gateway, upstream, pki, tmp_path):
    gw = await start_gateway(basic_config(upstream.url))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    gw.write_config(
        basic_config(upstream.url, server={"tls": {"certificate": str(bad), "private_key": pki.server_key}})
    )
    assert await gw.reload() == "failure"
    assert "cannot load certificate" in gw.output()
    async with gw.session() as s:
        async with s.get(gw.url + "/still") as r:
            assert r.status == 200


def _get_with_session(port: int, ctx: ssl.SSLContext, session=None):
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data, tls.session, tls.session_reused


async def test_tls_sessions_resume(shared):
    # Session tickets are on, also through the listener's context swap (SNI callback).
    gw = shared.gw
    ctx = gw.ssl_context()
    loop = asyncio.get_running_loop()
    first, session, reused = await loop.run_in_executor(None, _get_with_session, gw.port, ctx, None)
    assert first.startswith(b"HTTP/1.1 200") and not reused and session is not None
    second, _, reused = await loop.run_in_executor(None, _get_with_session, gw.port, ctx, session)
    assert second.startswith(b"HTTP/1.1 200") and reused
