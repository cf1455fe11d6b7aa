"""Development PKI: a dev CA, a localhost server certificate, enterprise-style client certificates
(virksomhetssertifikat) and the dev token issuer's key pair. For development and tests only.

Files written into one directory (``portvakt dev-certs DIR``; ``make run`` uses ``certs/dev``):

=============================  ================================================================
``ca.pem`` / ``ca-key.pem``    the dev CA (trust anchor for server and client certificates)
``server.pem`` / ``server-key.pem``  server certificate for localhost, 127.0.0.1 and ::1
``client-<org>-seid2.pem`` (+ ``-key.pem``)  SEID 2: ``organizationIdentifier=NTRNO-<org>``
``client-<org>-seid1.pem`` (+ ``-key.pem``)  SEID 1: ``serialNumber=<org>``
``issuer-key.pem``             RSA private key of the dev token issuer (``portvakt dev-token``)
``issuer-jwks.json``           its public key as a JWKS (``{"keys": [{"kid": ...}]}``)
``persons-client-key.pem``     RSA key of the demo's persons login client (``private_key_jwt``)
``altinn-client-key.pem``      RSA key the demo gateway signs its Maskinporten grant for the fake Altinn with
=============================  ================================================================

Private keys are written with mode 0600. Generation is idempotent: files already present are kept
(and an existing CA signs new certificates) unless ``force`` is set. TLS keys are ECDSA P-256
(fast to make, accepted by every TLS stack); the token issuer key is RSA 2048 because Maskinporten
and ID-porten sign with RS256.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Org numbers used by the demo and the test fixtures (real public-sector org numbers, valid
# mod-11): Digitaliseringsdirektoratet (SEID 2 dev client) and Oslo kommune (SEID 1 dev client).
DEFAULT_SEID2_ORGS = ("991825827",)
DEFAULT_SEID1_ORGS = ("958935420",)
KNOWN_ORG_NAMES = {
    "991825827": "DIGITALISERINGSDIREKTORATET",
    "958935420": "OSLO KOMMUNE",
    "974760673": "REGISTERENHETEN I BRØNNØYSUND",
}

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
ISSUER_KEY, ISSUER_JWKS = "issuer-key.pem", "issuer-jwks.json"
PERSONS_CLIENT_KEY = "persons-client-key.pem"  # the demo's private_key_jwt key (config/demo.yaml persons:)
ALTINN_CLIENT_KEY = "altinn-client-key.pem"  # the demo gateway's Maskinporten key for Altinn (delegation:)
CRL_FILE = "crl.pem"

_CA_DAYS = 3650
_LEAF_DAYS = 825
_BACKDATE = dt.timedelta(hours=1)  # tolerate small clock differences between processes


def client_cert_names(org: str, seid: int = 2) -> tuple[str, str]:
    """File names (certificate, key) of a client certificate inside the dev PKI directory."""
    if seid not in (1, 2):
        raise ValueError("seid must be 1 or 2")
    return f"client-{org}-seid{seid}.pem", f"client-{org}-seid{seid}-key.pem"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key) -> None:
    """Write a private key PEM readable by the owner only (created 0600, never widened)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_public(path, cert.public_bytes(serialization.Encoding.PEM))


def _load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate and its key, able to sign leaf certificates and CRLs."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "Portvakt Dev CA") -> CertificateAuthority:
        key = _new_ec_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portvakt (development only)"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        return cls(_load_cert(cert_path), _load_key(key_path))

    def _leaf(
        self,
        subject: x509.Name,
        public_key,
        eku: Sequence[x509.ObjectIdentifier],
        san: x509.SubjectAlternativeName | None = None,
        days: int = _LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        start = not_before if not_before is not None else _now() - _BACKDATE
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if san is not None:
            b = b.add_extension(san, critical=False)
        return b.sign(self.key, hashes.SHA256())

    def server_certificate(
        self, hosts: Iterable[str] = ("localhost", "127.0.0.1", "::1")
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A TLS server certificate whose SAN lists ``hosts`` (DNS names or IP addresses)."""
        key = _new_ec_key()
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portvakt (development only)"),
                x509.NameAttribute(NameOID.COMMON_NAME, next(iter(hosts), "localhost")),
            ]
        )
        cert = self._leaf(
            subject, key.public_key(), [ExtendedKeyUsageOID.SERVER_AUTH], x509.SubjectAlternativeName(names)
        )
        return cert, key

    def client_certificate(
        self,
        org: str,
        seid: int = 2,
        organization_name: str | None = None,
        common_name: str | None = None,
        days: int = _LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """An enterprise certificate shaped like a Norwegian virksomhetssertifikat.

        SEID 2 carries the org number as ``organizationIdentifier=NTRNO-<org>`` (OID 2.5.4.97),
        SEID 1 as ``serialNumber=<org>`` (OID 2.5.4.5). The org number is not checked for mod-11
        on purpose: tests need certificates with invalid numbers too.
        """
        if seid not in (1, 2):
            raise ValueError("seid must be 1 or 2")
        if not org.isdigit():
            raise ValueError(f"org number must be digits: {org!r}")
        key = _new_ec_key()
        o = organization_name or KNOWN_ORG_NAMES.get(org, f"TESTVIRKSOMHET {org}")
        cn = common_name or f"{o} - PORTVAKT DEV"
        attrs = [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, o),
        ]
        if seid == 2:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, f"NTRNO-{org}"))
        else:
            attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, org))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        cert = self._leaf(
            x509.Name(attrs),
            key.public_key(),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            days=days,
            not_before=not_before,
        )
        return cert, key

    def crl(self, revoked: Iterable[x509.Certificate], days: int = 7) -> x509.CertificateRevocationList:
        """A CRL signed by this CA listing ``revoked`` (by serial number)."""
        now = _now()
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
        )
        for c in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(c.serial_number)
                .revocation_date(now - dt.timedelta(minutes=1))
                .build()
            )
        return b.sign(self.key, hashes.SHA256())


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rsa_public_jwk(public_key: rsa.RSAPublicKey, alg: str = "RS256") -> dict[str, str]:
    """The public JWK of an RSA key with ``kid`` = RFC 7638 thumbprint (base64url SHA-256)."""
    nums = public_key.public_numbers()
    e, n = _b64url_uint(nums.e), _b64url_uint(nums.n)
    thumb = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(thumb).digest()).rstrip(b"=").decode()
    return {"kty": "RSA", "use": "sig", "alg": alg, "kid": kid, "n": n, "e": e}


@dataclass(frozen=True)
class DevPki:
    """Paths of a generated dev PKI directory (see the module docstring for the layout)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.dir / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.dir / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.dir / SERVER_KEY

    @property
    def issuer_key(self) -> Path:
        return self.dir / ISSUER_KEY

    @property
    def issuer_jwks(self) -> Path:
        return self.dir / ISSUER_JWKS

    @property
    def issuer_kid(self) -> str:
        return json.loads(self.issuer_jwks.read_text())["keys"][0]["kid"]

    def client(self, org: str, seid: int = 2) -> tuple[Path, Path]:
        cert, key = client_cert_names(org, seid)
        return self.dir / cert, self.dir / key

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.ca_key)

    def issue_client(
        self, org: str, seid: int = 2, force: bool = False, label: str | None = None, **kw
    ) -> tuple[Path, Path]:
        """Make (or keep, unless ``force``) the client certificate for ``org``/``seid``.

        ``label`` names a variant (``client-<org>-seid<n>-<label>.pem``) made with the extra
        keyword arguments of ``CertificateAuthority.client_certificate`` (``days``,
        ``not_before``, ``common_name``...), so variants never replace the standard file.
        """
        cert_path, key_path = self.client(org, seid)
        if label:
            cert_path = cert_path.with_name(f"client-{org}-seid{seid}-{label}.pem")
            key_path = key_path.with_name(f"client-{org}-seid{seid}-{label}-key.pem")
        elif kw:
            raise ValueError("custom client certificates need a label")
        if force or not (cert_path.exists() and key_path.exists()):
            cert, key = self.ca().client_certificate(org, seid, **kw)
            _write_private(key_path, key)
            _write_cert(cert_path, cert)
        return cert_path, key_path

    def write_crl(
        self, revoked_cert_paths: Iterable[str | os.PathLike[str]], path: str | os.PathLike[str] | None = None
    ) -> Path:
        """Write a CRL signed by the dev CA revoking exactly the given certificates."""
        out = Path(path) if path is not None else self.dir / CRL_FILE
        certs = [_load_cert(Path(p)) for p in revoked_cert_paths]
        _write_public(out, self.ca().crl(certs).public_bytes(serialization.Encoding.PEM))
        return out


def generate(
    directory: str | os.PathLike[str],
    seid2_orgs: Iterable[str] = DEFAULT_SEID2_ORGS,
    seid1_orgs: Iterable[str] = DEFAULT_SEID1_ORGS,
    force: bool = False,
) -> tuple[DevPki, list[Path]]:
    """Create (or complete) a dev PKI in ``directory``. Returns it and the files written now.

    Existing files are kept unless ``force``; a kept CA signs any certificates still missing. With
    ``force`` everything is regenerated, including the CA (so old client certificates stop
    chaining).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pki = DevPki(d)
    written: list[Path] = []

    if force or not (pki.ca_cert.exists() and pki.ca_key.exists()):
        ca = CertificateAuthority.create()
        _write_private(pki.ca_key, ca.key)
        _write_cert(pki.ca_cert, ca.cert)
        written += [pki.ca_cert, pki.ca_key]
        force = True  # a new CA invalidates everything it did not sign
    else:
        ca = pki.ca()

    if force or not (pki.server_cert.exists() and pki.server_key.exists()):
        cert, key = ca.server_certificate()
        _write_private(pki.server_key, key)
        _write_cert(pki.server_cert, cert)
        written += [pki.server_cert, pki.server_key]

    for seid, orgs in ((2, seid2_orgs), (1, seid1_orgs)):
        for org in orgs:
            cert_path, key_path = pki.client(org, seid)
            if force or not (cert_path.exists() and key_path.exists()):
                cert, key = ca.client_certificate(org, seid)
                _write_private(key_path, key)
                _write_cert(cert_path, cert)
                written += [cert_path, key_path]

    if force or not (pki.issuer_key.exists() and pki.issuer_jwks.exists()):
        ikey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(pki.issuer_key, ikey)
        jwks = {"keys": [rsa_public_jwk(ikey.public_key())]}
        _write_public(pki.issuer_jwks, (json.dumps(jwks, indent=2) + "\n").encode())
        written += [pki.issuer_key, pki.issuer_jwks]

    # The demo gateway's private_key_jwt key at the dev ID-porten (config/demo.yaml `persons:`),
    # so `portvakt check-config config/demo.yaml` passes before the first `make run`.
    # Likewise the key the demo gateway signs its Maskinporten grant with for the fake Altinn
    # (config/demo.yaml `delegation.altinn`).
    for name in (PERSONS_CLIENT_KEY, ALTINN_CLIENT_KEY):
        pkey_path = pki.dir / name
        if force or not pkey_path.exists():
            _write_private(pkey_path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
            written.append(pkey_path)
    return pki, written


def org_number(cert: x509.Certificate) -> tuple[str | None, int | None]:
    """Org number and SEID of an enterprise certificate: organizationIdentifier first, then
    serialNumber. (A small helper for tests and tooling; the certificates filter has its own.)"""
    for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER):
        v = str(a.value)
        if v.startswith("NTRNO-"):
            return v[len("NTRNO-") :], 2
    for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        return str(a.value), 1
    return None, None


# --- CLI ------------------------------------------------------------------------------------


def _orgs(values: list[str] | None, default: Sequence[str]) -> list[str]:
    if not values:
        return list(default)
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    for o in out:
        if not o.isdigit():
            raise SystemExit(f"dev-certs: org number must be digits: {o!r}")
    return out


def _cmd_dev_certs(args: argparse.Namespace) -> int:
    try:
        pki, written = generate(
            args.dir,
            seid2_orgs=_orgs(args.org, DEFAULT_SEID2_ORGS),
            seid1_orgs=_orgs(args.seid1_org, DEFAULT_SEID1_ORGS),
            force=args.force,
        )
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"portvakt dev-certs: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    if written:
        for p in written:
            print(f"wrote {p}")
    else:
        print(f"dev certificates in {pki.dir} already present (use --force to regenerate)")
    return 0


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dev-certs`` to the ``portvakt`` CLI. The handler is ``args.func(args) -> exit code``."""
    p = subparsers.add_parser(
        "dev-certs",
        help="make a development CA, server, enterprise client and token-issuer keys",
        description=(
            "Write a dev CA, a server certificate for localhost/127.0.0.1/::1, enterprise client "
            "certificates (SEID 2: organizationIdentifier=NTRNO-<org>; SEID 1: serialNumber=<org>) "
            "and the dev token issuer's key pair (issuer-key.pem, issuer-jwks.json) into DIR. "
            "Existing files are kept unless --force. For development and tests only."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="output directory (created when missing)")
    p.add_argument(
        "--org",
        action="append",
        metavar="ORGNO",
        help=f"org number for a SEID 2 client certificate; repeatable (default {DEFAULT_SEID2_ORGS[0]})",
    )
    p.add_argument(
        "--seid1-org",
        action="append",
        metavar="ORGNO",
        help=f"org number for a SEID 1 client certificate; repeatable (default {DEFAULT_SEID1_ORGS[0]})",
    )
    p.add_argument("--force", action="store_true", help="regenerate everything, including the CA")
    p.set_defaults(func=_cmd_dev_certs)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m gateway.dev.ca DIR``) for when the CLI is unavailable."""
    parser = argparse.ArgumentParser(prog="portvakt")
    sub = parser.add_subparsers(dest="command", required=True)
    register_commands(sub)
    args = parser.parse_args(["dev-certs", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
