"""Unit tests of filters/certificates.py on hand-built contexts with certificates from the dev CA."""

from __future__ import annotations

import base64
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from filters.certificates import CertificatesConfig, build_stage, org_number, parse_xfcc
from gateway.chain import ALLOW, SKIP, BuildEnv, Deny
from gateway.config import Config
from gateway.context import RequestContext, TlsInfo


def make_ctx(
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    chain: tuple[bytes, ...] = (),
    trusted: bool = False,
) -> RequestContext:
    h: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items() if isinstance(headers, dict) else headers or []:
        h.add(k, v)
    ip = ip_address("127.0.0.1")
    return RequestContext(
        request_id="req-1",
        method="GET",
        raw_path="/",
        path="/",
        query_string="",
        host="localhost",
        scheme="https",
        peer_ip=ip,
        client_ip=ip,
        headers=CIMultiDictProxy(h),
        request=None,
        runtime=None,  # type: ignore[arg-type]
        tls=TlsInfo(peer_chain_der=chain),
        from_trusted_proxy=trusted,
    )


def stage_for(pki, **certificates: Any):
    tls = {
        "certificate": pki.server_cert,
        "private_key": pki.server_key,
        "client_ca": pki.ca_cert,
        "client_certificate": "optional",
    }
    cfg = Config.model_validate(
        {
            "server": {"tls": tls},
            "upstreams": {"up": {"url": "http://127.0.0.1:9"}},
            "routes": [{"name": "r", "upstream": "up"}],
            "certificates": certificates,
        }
    )
    return build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))


async def check(stage, ctx):
    [f] = stage.filters_for_route(None)
    return await f.check(ctx)


def pem(path: str) -> bytes:
    return Path(path).read_bytes()


def der(path: str) -> bytes:
    return x509.load_pem_x509_certificate(pem(path)).public_bytes(serialization.Encoding.DER)


def xfcc(cert_path: str, chain: list[str] | None = None) -> str:
    v = f'By=spiffe://lb;Hash=abc;Cert="{quote(pem(cert_path).decode(), safe="")}"'
    if chain:
        v += f';Chain="{quote(b"".join(pem(p) for p in chain).decode(), safe="")}"'
    return v + ';Subject="CN=x,O=y";URI='


def client_cert_header(cert_path: str) -> str:
    return ":" + base64.b64encode(der(cert_path)).decode() + ":"


# -- TLS handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize("which, org, seid", [("seid2", "991825827", 2), ("seid1", "958935420", 1)])
async def test_tls_client_certificate_yields_org(pki, which, org, seid):
    stage = stage_for(pki)
    cert = getattr(pki, f"client_{which}_cert")
    ctx = make_ctx(chain=(der(cert),))
    assert await check(stage, ctx) is ALLOW
    c = ctx.certificate
    assert (c.org_number, c.seid, c.source) == (org, seid, "tls")
    assert c.der == der(cert) and len(c.fingerprint_sha256) == 64 and "O=" in c.subject
    assert ctx.organization == org
    assert ctx.audit["certificates"]["org"] == org
    ctx2 = make_ctx(chain=(der(cert),))  # second time from the parse cache: same identity
    assert await check(stage, ctx2) is ALLOW and ctx2.certificate == c


async def test_no_certificate_skips(pki):
    assert await check(stage_for(pki), make_ctx()) is SKIP


def test_org_number_rules(pki):
    from gateway.dev import ca as devca

    ca = devca.DevPki(Path(pki.dir)).ca()
    cert, _ = ca.client_certificate("991825827", 2)
    assert org_number(cert) == ("991825827", 2)
    cert, _ = ca.client_certificate("958935420", 1)
    assert org_number(cert) == ("958935420", 1)
    cert, _ = ca.client_certificate("12345", 1)  # not nine digits: no org number
    assert org_number(cert) == (None, None)
    server = x509.load_pem_x509_certificate(pem(pki.server_cert))
    assert org_number(server) == (None, None)


# -- revocation ------------------------------------------------------------------------------


async def test_crl_revokes(pki):
    revoked_cert, _ = pki.client_cert("974760673", 2)
    crl = pki.revoke(revoked_cert)
    stage = stage_for(pki, crl_files=[crl])
    ctx = make_ctx(chain=(der(revoked_cert),))
    d = await check(stage, ctx)
    assert type(d) is Deny and (d.problem.reason, d.problem.status) == ("certificate_revoked", 403)
    assert ctx.certificate is None
    ctx = make_ctx(chain=(der(pki.client_seid2_cert),))
    assert await check(stage, ctx) is ALLOW
    # A config reload reads the CRL again: an empty CRL lets the certificate back in.
    assert (
        await check(stage_for(pki, crl_files=[pki.revoke()]), make_ctx(chain=(der(revoked_cert),))) is ALLOW
    )


async def test_crl_also_applies_to_forwarded_certs(pki):
    revoked_cert, _ = pki.client_cert("974760673", 2)
    stage = stage_for(pki, crl_files=[pki.revoke(revoked_cert)], forwarded_format="xfcc")
    d = await check(stage, make_ctx({"X-Forwarded-Client-Cert": xfcc(revoked_cert)}, trusted=True))
    assert d.problem.reason == "certificate_revoked"


def test_crl_problems_fail_the_build(pki, tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        stage_for(pki, crl_files=[str(tmp_path / "missing.pem")])
    (tmp_path / "junk.pem").write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(ValueError, match="not a CRL"):
        stage_for(pki, crl_files=[str(tmp_path / "junk.pem")])
    # A CRL naming the dev CA as issuer but signed by another key is refused.
    from gateway.dev import ca as devca

    other, _ = devca.generate(tmp_path / "other", seid2_orgs=[], seid1_orgs=[])
    real = devca.DevPki(Path(pki.dir)).ca()
    forged = devca.CertificateAuthority(real.cert, other.ca().key).crl([])
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="signature"):
        stage_for(pki, crl_files=[str(tmp_path / "forged.pem")])


# -- forwarded certificates ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["xfcc", "client-cert", "nginx"])
async def test_forwarded_cert_from_trusted_proxy(pki, fmt):
    stage = stage_for(pki, forwarded_format=fmt)
    headers = {
        "xfcc": {"X-Forwarded-Client-Cert": xfcc(pki.client_seid1_cert)},
        "client-cert": {"Client-Cert": client_cert_header(pki.client_seid1_cert)},
        "nginx": {"X-SSL-Client-Cert": quote(pem(pki.client_seid1_cert).decode(), safe="")},
    }[fmt]
    ctx = make_ctx(headers, trusted=True)
    assert await check(stage, ctx) is ALLOW
    assert (ctx.certificate.org_number, ctx.certificate.seid, ctx.certificate.source) == ("958935420", 1, fmt)
    # The same header from an untrusted peer is ignored: no certificate at all.
    ctx = make_ctx(headers, trusted=False)
    assert await check(stage, ctx) is SKIP and ctx.certificate is None
    assert ctx.audit["certificates"] == {"forwarded_ignored": "untrusted peer"}
    # ...and an untrusted peer's own TLS certificate is what counts.
    ctx = make_ctx(headers, chain=(der(pki.client_seid2_cert),), trusted=False)
    assert await check(stage, ctx) is ALLOW and ctx.certificate.org_number == "991825827"


async def test_forwarded_header_ignored_when_format_none(pki):
    stage = stage_for(pki)
    ctx = make_ctx({"X-Forwarded-Client-Cert": xfcc(pki.client_seid1_cert)}, trusted=True)
    assert await check(stage, ctx) is SKIP and ctx.certificate is None


async def test_xfcc_with_chain_and_custom_header(pki):
    stage = stage_for(pki, forwarded_format="xfcc", forwarded_header="X-Client-Cert-Details")
    value = xfcc(pki.client_seid2_cert, chain=[pki.client_seid2_cert])
    ctx = make_ctx({"X-Client-Cert-Details": value}, trusted=True)
    assert await check(stage, ctx) is ALLOW and ctx.certificate.org_number == "991825827"


async def test_xfcc_uses_the_element_of_the_nearest_proxy(pki):
    stage = stage_for(pki, forwarded_format="xfcc")
    spoofed = xfcc(pki.client_seid2_cert)  # what a client could inject upstream of the proxy
    value = spoofed + "," + xfcc(pki.client_seid1_cert)
    ctx = make_ctx({"X-Forwarded-Client-Cert": value}, trusted=True)
    assert await check(stage, ctx) is ALLOW and ctx.certificate.org_number == "958935420"


def test_parse_xfcc_quotes():
    cert, chain = parse_xfcc('By="a,b;c";Cert="%2D%2D";Subject="O=\\"x\\", CN=y"')
    assert cert == b"--" and chain == []


@pytest.mark.parametrize(
    "label, fmt, headers, internal",
    [
        (
            "garbage xfcc",
            "xfcc",
            [("X-Forwarded-Client-Cert", 'Cert="not a cert"')],
            "certificate_header_malformed",
        ),
        ("unbalanced", "xfcc", [("X-Forwarded-Client-Cert", 'Cert="abc')], "certificate_header_malformed"),
        ("no cert", "xfcc", [("X-Forwarded-Client-Cert", "By=x;Hash=y")], "certificate_header_malformed"),
        ("not sf-binary", "client-cert", [("Client-Cert", "abc")], "certificate_header_malformed"),
        ("bad base64", "client-cert", [("Client-Cert", ":@@@:")], "certificate_header_malformed"),
        ("not DER", "client-cert", [("Client-Cert", ":aGVsbG8=:")], "certificate_header_malformed"),
        (
            "two headers",
            "client-cert",
            [("Client-Cert", "{seid2}"), ("Client-Cert", "{seid1}")],
            "certificate_header_malformed",
        ),
        ("nginx junk", "nginx", [("X-SSL-Client-Cert", "hello")], "certificate_header_malformed"),
        ("untrusted CA", "client-cert", [("Client-Cert", "{untrusted}")], "certificate_chain_invalid"),
        ("expired", "client-cert", [("Client-Cert", "{expired}")], "certificate_chain_invalid"),
        (
            "server cert (no clientAuth)",
            "client-cert",
            [("Client-Cert", "{server}")],
            "certificate_chain_invalid",
        ),
        ("CA cert as leaf", "client-cert", [("Client-Cert", "{ca}")], "certificate_chain_invalid"),
    ],
)
async def test_bad_forwarded_certs_are_refused(pki, label, fmt, headers, internal):
    subst = {
        "{seid2}": client_cert_header(pki.client_seid2_cert),
        "{seid1}": client_cert_header(pki.client_seid1_cert),
        "{untrusted}": client_cert_header(pki.untrusted_client_cert("991825827")[0]),
        "{expired}": client_cert_header(pki.expired_client_cert("991825827")[0]),
        "{server}": client_cert_header(pki.server_cert),
        "{ca}": client_cert_header(pki.ca_cert),
    }
    stage = stage_for(pki, forwarded_format=fmt)
    ctx = make_ctx([(k, subst.get(v, v)) for k, v in headers], trusted=True)
    d = await check(stage, ctx)
    assert type(d) is Deny, label
    assert (d.problem.reason, d.problem.status, d.problem.internal_reason) == (
        "certificate_invalid",
        403,
        internal,
    ), label
    assert ctx.certificate is None


async def test_rfc9440_chain_header_is_read(pki):
    stage = stage_for(pki, forwarded_format="client-cert")
    headers = [
        ("Client-Cert", client_cert_header(pki.client_seid2_cert)),
        ("Client-Cert-Chain", client_cert_header(pki.ca_cert)),
    ]
    ctx = make_ctx(headers, trusted=True)
    assert await check(stage, ctx) is ALLOW and ctx.certificate.source == "client-cert"


def test_forwarded_format_needs_a_ca_bundle(pki):
    cfg = Config.model_validate(
        {
            "server": {"plain_http": True},
            "certificates": {"forwarded_format": "xfcc"},
        }
    )
    with pytest.raises(ValueError, match="CA bundle"):
        build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    cfg = Config.model_validate(
        {
            "server": {"plain_http": True},
            "certificates": {"forwarded_format": "xfcc", "ca_file": pki.ca_cert},
        }
    )
    assert build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})) is not None


def test_mode_off_builds_nothing_and_config_validates():
    cfg = Config.model_validate({"server": {"plain_http": True}, "certificates": {"mode": "off"}})
    assert build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})) is None
    with pytest.raises(ValidationError):
        CertificatesConfig.model_validate({"forwarded_format": "haproxy"})


def test_reasons_registered():
    from gateway.problems import REASONS

    assert REASONS["certificate_revoked"][0] == 403
    assert REASONS["certificate_invalid"][0] == 403
