"""gateway/dev/ca.py: the dev PKI is real (chains verify, TLS handshakes work), shaped right, and
its generation is idempotent with private keys kept private."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import ssl
import stat

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.dev import ca as devca


def _cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _verify_signed_by_ca(cert: x509.Certificate, ca: x509.Certificate) -> None:
    cert.verify_directly_issued_by(ca)  # raises when the signature or issuer name is wrong


@pytest.mark.parametrize(
    "attr, seid, org, oid, value",
    [
        ("client_seid2_cert", 2, "991825827", NameOID.ORGANIZATION_IDENTIFIER, "NTRNO-991825827"),
        ("client_seid1_cert", 1, "958935420", NameOID.SERIAL_NUMBER, "958935420"),
    ],
)
def test_enterprise_client_certificates(pki, attr, seid, org, oid, value):
    cert = _cert(getattr(pki, attr))
    _verify_signed_by_ca(cert, _cert(pki.ca_cert))
    assert [a.value for a in cert.subject.get_attributes_for_oid(oid)] == [value]
    assert cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "NO"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert devca.org_number(cert) == (org, seid)
    # SEID 1 has no organizationIdentifier and SEID 2 no serialNumber: the org is unambiguous.
    other = NameOID.SERIAL_NUMBER if seid == 2 else NameOID.ORGANIZATION_IDENTIFIER
    assert not cert.subject.get_attributes_for_oid(other)


def test_server_certificate_names_and_usage(pki):
    cert = _cert(pki.server_cert)
    _verify_signed_by_ca(cert, _cert(pki.ca_cert))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca = _cert(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign is True


def test_private_keys_are_0600(pki):
    keys = [pki.ca_key, pki.server_key, pki.client_seid2_key, pki.client_seid1_key, pki.issuer_key]
    for k in keys:
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600, k
    assert stat.S_IMODE(os.stat(pki.ca_cert).st_mode) == 0o644


def test_issuer_key_matches_jwks_and_signs_rs256(pki):
    with open(pki.issuer_jwks) as f:
        jwks = json.load(f)
    (jwk,) = jwks["keys"]
    assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["kid"] == pki.issuer_kid
    with open(pki.issuer_key, "rb") as f:
        priv = serialization.load_pem_private_key(f.read(), None)
    token = jwt.encode({"sub": "x"}, priv, algorithm="RS256", headers={"kid": jwk["kid"]})
    pub = jwt.PyJWK(jwk).key
    assert jwt.decode(token, pub, algorithms=["RS256"])["sub"] == "x"


def test_generate_is_idempotent_and_force_regenerates(tmp_path):
    pki, written = devca.generate(tmp_path, seid2_orgs=["991825827"], seid1_orgs=[])
    assert (
        len(written) == 10
    )  # + persons-client-key.pem (the demo login client), altinn-client-key.pem (delegation)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _, again = devca.generate(tmp_path, seid2_orgs=["991825827"], seid1_orgs=[])
    assert again == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # A new org reuses the existing CA.
    _, more = devca.generate(tmp_path, seid2_orgs=["991825827", "974760673"], seid1_orgs=[])
    assert sorted(p.name for p in more) == ["client-974760673-seid2-key.pem", "client-974760673-seid2.pem"]
    _verify_signed_by_ca(_cert(str(more[0].with_name("client-974760673-seid2.pem"))), _cert(str(pki.ca_cert)))
    _, forced = devca.generate(tmp_path, seid2_orgs=["991825827"], seid1_orgs=[], force=True)
    assert len(forced) == 10
    assert pki.ca_cert.read_bytes() != before["ca.pem"]


def test_cli_dev_certs(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="portvakt")
    sub = parser.add_subparsers(dest="command", required=True)
    devca.register_commands(sub)
    args = parser.parse_args(
        ["dev-certs", str(tmp_path), "--org", "991825827,974760673", "--seid1-org", "958935420"]
    )
    assert args.func(args) == 0
    names = {p.name for p in tmp_path.iterdir()}
    for org, seid in (("991825827", 2), ("974760673", 2), ("958935420", 1)):
        assert set(devca.client_cert_names(org, seid)) <= names
    assert {"issuer-key.pem", "issuer-jwks.json", "ca.pem", "server.pem"} <= names
    capsys.readouterr()
    assert args.func(args) == 0
    assert "already present" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bad = parser.parse_args(["dev-certs", str(tmp_path), "--org", "99182582x"])
        bad.func(bad)


def test_crl_revokes_exactly_the_given_certificates(pki):
    crl_path = pki.revoke(pki.client_seid1_cert)
    with open(crl_path, "rb") as f:
        crl = x509.load_pem_x509_crl(f.read())
    ca = _cert(pki.ca_cert)
    assert crl.is_signature_valid(ca.public_key())
    assert crl.get_revoked_certificate_by_serial_number(_cert(pki.client_seid1_cert).serial_number)
    assert crl.get_revoked_certificate_by_serial_number(_cert(pki.client_seid2_cert).serial_number) is None
    empty = pki.revoke()
    assert empty != crl_path
    with open(empty, "rb") as f:
        assert len(x509.load_pem_x509_crl(f.read())) == 0


def test_expired_and_untrusted_variants(pki):
    c, _ = pki.expired_client_cert("991825827")
    assert c != pki.client_seid2_cert
    assert _cert(c).not_valid_after_utc < dt.datetime.now(dt.UTC)
    u, _ = pki.untrusted_client_cert("991825827")
    with pytest.raises((ValueError, InvalidSignature)):
        _verify_signed_by_ca(_cert(u), _cert(pki.ca_cert))


async def test_real_mtls_handshake_with_dev_certificates(pki):
    """A TLS server with the dev server cert requiring client certs: the dev SEID 2 cert is
    accepted and its subject reaches the server; a handshake without a cert fails."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(str(peer))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_ssl(client_ca=True))
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.client_ssl(pki.client_seid2_cert, pki.client_seid2_key)
        )
        assert await r.read() == b"ok"
        w.close()
        assert "NTRNO-991825827" in seen[0]

        with pytest.raises((ssl.SSLError, ConnectionError)):
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pki.client_ssl(), server_hostname="localhost"
            )
            # TLS 1.3: the server's rejection arrives after the client's handshake completes.
            data = await r.read()
            if not data:
                raise ConnectionError("closed by server")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.e2e
def test_portvakt_cli_dev_certs_subprocess(tmp_path):
    """`python -m gateway dev-certs` (the `portvakt` console script) reaches register_commands."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "dev-certs",
            str(tmp_path / "d"),
            "--org",
            "974760673",
            "--seid1-org",
            "958935420",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    d = tmp_path / "d"
    assert (d / "client-974760673-seid2.pem").exists() and (d / "client-958935420-seid1.pem").exists()
    assert not (d / "client-991825827-seid2.pem").exists()  # --org replaces the default
    assert stat.S_IMODE(os.stat(d / "issuer-key.pem").st_mode) == 0o600
