"""Enterprise client certificates end to end: real mTLS handshakes with the dev CA's SEID 1 and
SEID 2 certificates, CRL revocation reloaded with the config, and certificates forwarded by a
TLS-terminating proxy (XFCC, RFC 9440) believed only from a trusted proxy address."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.fixtures.gateway import basic_config

SEID2_ORG = "991825827"
SEID1_ORG = "958935420"
ORG_HEADER = "X-Portvakt-Certificate-Org"


def config(upstream_url: str, **sections) -> dict:
    cfg = basic_config(upstream_url, **sections)
    cfg["routes"] = [
        {
            "name": "seid2",
            "upstream": "demo",
            "match": {"path_prefix": "/seid2/"},
            "access": {"any_of": [{"certificate_orgs": [SEID2_ORG]}]},
        },
        {
            "name": "seid1",
            "upstream": "demo",
            "match": {"path_prefix": "/seid1/"},
            "access": {"any_of": [{"certificate_orgs": [SEID1_ORG]}]},
        },
    ]
    return cfg


async def status_of(session, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    async with session.get(url, headers=headers or {}) as r:
        await r.read()
        body = (
            await r.json(content_type=None)
            if r.headers.get("Content-Type", "").startswith("application/problem")
            else {}
        )
        return r.status, body


async def test_seid1_and_seid2_certificates_yield_the_right_org(start_gateway, upstream, pki):
    gw = await start_gateway(config(upstream.url))
    for cert, key, org, mine, other in [
        (pki.client_seid2_cert, pki.client_seid2_key, SEID2_ORG, "/seid2/x", "/seid1/x"),
        (pki.client_seid1_cert, pki.client_seid1_key, SEID1_ORG, "/seid1/x", "/seid2/x"),
    ]:
        upstream.clear()
        async with gw.session(cert, key) as s:
            assert (await status_of(s, gw.url + mine))[0] == 200
            assert upstream.requests[-1]["headers"][ORG_HEADER] == org
            assert (await status_of(s, gw.url + other))[0] == 403
        assert len(upstream.requests) == 1
    async with gw.session() as s:  # no certificate at all
        assert (await status_of(s, gw.url + "/seid2/x"))[0] == 401


async def test_revoked_certificate_refused_until_the_crl_is_reloaded(start_gateway, upstream, pki):
    cert, key = pki.client_cert("974760673", 2)
    cfg = config(upstream.url, certificates={"crl_files": [pki.revoke(cert)]})
    cfg["routes"][0]["access"]["any_of"][0]["certificate_orgs"].append("974760673")
    gw = await start_gateway(cfg)
    async with gw.session(cert, key) as s:
        status, body = await status_of(s, gw.url + "/seid2/x")
        assert (status, body["reason"]) == (403, "certificate_revoked")
    async with gw.session(pki.client_seid2_cert, pki.client_seid2_key) as s:
        assert (await status_of(s, gw.url + "/seid2/x"))[0] == 200
    cfg["certificates"]["crl_files"] = [pki.revoke()]  # a new CRL that revokes nothing
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    async with gw.session(cert, key) as s:
        assert (await status_of(s, gw.url + "/seid2/x"))[0] == 200
    assert len(upstream.requests) == 2


def _xfcc(cert_path: str) -> dict[str, str]:
    pem = Path(cert_path).read_text()
    return {"X-Forwarded-Client-Cert": f'Hash=00;Cert="{quote(pem, safe="")}";Subject="";URI='}


def _client_cert(cert_path: str) -> dict[str, str]:
    der = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return {"Client-Cert": ":" + base64.b64encode(der).decode() + ":"}


@pytest.mark.parametrize("fmt, make", [("xfcc", _xfcc), ("client-cert", _client_cert)])
async def test_forwarded_certificate_only_from_a_trusted_proxy(start_gateway, upstream, pki, fmt, make):
    certificates = {"forwarded_format": fmt, "ca_file": pki.ca_cert}
    cfg = config(
        upstream.url, server={"plain_http": True}, trusted_proxies=["127.0.0.1/32"], certificates=certificates
    )
    gw = await start_gateway(cfg)
    async with gw.session() as s:
        assert (await status_of(s, gw.url + "/seid1/x", make(pki.client_seid1_cert)))[0] == 200
        assert upstream.requests[-1]["headers"][ORG_HEADER] == SEID1_ORG
        assert (await status_of(s, gw.url + "/seid2/x", make(pki.client_seid2_cert)))[0] == 200
        assert upstream.requests[-1]["headers"][ORG_HEADER] == SEID2_ORG
        # Forwarded but not chaining to the CA bundle: refused even from the trusted proxy.
        status, body = await status_of(s, gw.url + "/seid1/x", make(pki.untrusted_client_cert(SEID1_ORG)[0]))
        assert (status, body["reason"]) == (403, "certificate_invalid")
    assert len(upstream.requests) == 2

    # The same requests from a peer that is not a trusted proxy: the header is ignored.
    cfg["trusted_proxies"] = ["192.0.2.0/24"]
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    upstream.clear()
    async with gw.session() as s:
        status, body = await status_of(s, gw.url + "/seid1/x", make(pki.client_seid1_cert))
        assert status == 401, body
    assert upstream.started == 0
