"""Enterprise client certificates (virksomhetssertifikat). Config section ``certificates:``.

The filter ``certificates`` runs on every route. It reads the client certificate from

- the TLS handshake (``ctx.tls.peer_chain_der``, leaf first; the listener already verified the
  chain against ``server.tls.client_ca``), or
- a header set by a TLS-terminating proxy, only when the TCP peer is in ``trusted_proxies``
  (``ctx.from_trusted_proxy``) and ``forwarded_format`` names the format: Envoy XFCC
  (``Cert="<url-encoded PEM>"``, ``Chain=...``; the element added by the nearest proxy, i.e. the
  last), RFC 9440 ``Client-Cert: :<base64 DER>:`` (+ ``Client-Cert-Chain``), or nginx's url-encoded
  PEM (``$ssl_client_escaped_cert``) in ``forwarded_header``. Portvakt then verifies the chain
  itself against ``ca_file`` (default ``server.tls.client_ca``): signatures, validity period, CA
  basic constraints and key usage, clientAuth EKU (``cryptography.x509.verification``). From any
  other peer these headers are ignored here (and stripped towards the upstream by the proxy).

The org number comes from ``organizationIdentifier`` (2.5.4.97, ``NTRNO-<orgno>``: SEID 2) first,
else ``serialNumber`` (2.5.4.5: SEID 1), into ``ctx.certificate``. Certificates listed in the
configured CRL files (read at load, so reloading the config reloads them) are refused with 403
``certificate_revoked``. No certificate: Skip.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from pydantic import Field

from gateway import problems
from gateway.chain import ALLOW, SKIP, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.configbase import Model
from gateway.context import CertificateIdentity, RequestContext
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig

log = logging.getLogger("portvakt.certificates")

DEFAULT_HEADERS = {
    "xfcc": "X-Forwarded-Client-Cert",
    "client-cert": "Client-Cert",
    "nginx": "X-SSL-Client-Cert",
}


class CertificatesConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce")
    crl_files: list[str] = Field(
        default_factory=list, description="CRL files (PEM or DER); revoked certs are refused"
    )
    forwarded_format: Literal["none", "xfcc", "client-cert", "nginx"] = Field(
        "none", description="Header format of a client cert forwarded by a trusted TLS-terminating proxy"
    )
    forwarded_header: str | None = Field(
        None,
        description="Header carrying the forwarded cert (default: X-Forwarded-Client-Cert for xfcc, "
        "Client-Cert for client-cert, X-SSL-Client-Cert for nginx)",
    )
    ca_file: str | None = Field(
        None, description="CA bundle a forwarded client cert must chain to (default: server.tls.client_ca)"
    )


CERTIFICATE_REVOKED = problems.register("certificate_revoked", 403, "Client certificate revoked")
CERTIFICATE_INVALID = problems.register("certificate_invalid", 403, "Client certificate not accepted")

_CACHE_MAX = 1024
_ORG = re.compile(r"[0-9]{9}", re.ASCII)


class CertError(Exception):
    """A forwarded certificate could not be parsed or verified. ``reason`` is internal."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def org_number(cert: x509.Certificate) -> tuple[str | None, int | None]:
    """(org number, SEID) of an enterprise certificate: organizationIdentifier ``NTRNO-<9 digits>``
    first (SEID 2), else a 9-digit serialNumber (SEID 1); (None, None) when neither holds one."""
    try:
        subject = cert.subject
    except ValueError:
        return None, None
    for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER):
        v = str(a.value)
        if v.startswith("NTRNO-") and _ORG.fullmatch(v[6:]):
            return v[6:], 2
    for a in subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        v = str(a.value)
        if _ORG.fullmatch(v):
            return v, 1
    return None, None


def identity_of(cert: x509.Certificate, der: bytes, source: str) -> CertificateIdentity:
    org, seid = org_number(cert)
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = ""
    return CertificateIdentity(
        org_number=org,
        subject=subject,
        serial_number=cert.serial_number,
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        source=source,
        der=der,
        seid=seid,
    )


# -- forwarded headers -----------------------------------------------------------------------


def _split_outside_quotes(s: str, sep: str) -> list[str]:
    out, cur, quoted, escaped = [], [], False, False
    for ch in s:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise CertError("certificate_header_malformed", "unbalanced quotes")
    out.append("".join(cur))
    return out


def parse_xfcc(value: str) -> tuple[bytes | None, list[bytes]]:
    """The last XFCC element's ``Cert`` and ``Chain`` as (leaf PEM or None, chain PEMs)."""
    elements = [e for e in _split_outside_quotes(value, ",") if e.strip()]
    if not elements:
        raise CertError("certificate_header_malformed", "empty XFCC")
    fields: dict[str, str] = {}
    for pair in _split_outside_quotes(elements[-1], ";"):
        if not pair.strip():
            continue
        k, eq, v = pair.strip().partition("=")
        if not eq:
            raise CertError("certificate_header_malformed", "XFCC pair without =")
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        key = k.strip().lower()
        if key in fields:
            raise CertError("certificate_header_malformed", f"XFCC key {k} twice")
        fields[key] = v
    cert = unquote(fields["cert"]).encode() if "cert" in fields else None
    chain = [unquote(fields["chain"]).encode()] if "chain" in fields else []
    return cert, chain


def _sf_binary(item: str) -> bytes:
    item = item.strip()
    if len(item) < 2 or item[0] != ":" or item[-1] != ":":
        raise CertError("certificate_header_malformed", "not an sf-binary item")
    try:
        return base64.b64decode(item[1:-1], validate=True)
    except (binascii.Error, ValueError):
        raise CertError("certificate_header_malformed", "bad base64") from None


def _pems(data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertError("certificate_header_malformed", "not PEM certificates") from None
    if not certs:
        raise CertError("certificate_header_malformed", "no certificate")
    return certs


def _der(data: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertError("certificate_header_malformed", "not a DER certificate") from None


@dataclass(slots=True, frozen=True)
class Forwarded:
    """How to read a forwarded client certificate: format and header names."""

    format: str
    header: str
    chain_header: str | None

    def present(self, ctx: RequestContext) -> bool:
        return self.header in ctx.headers or (
            self.chain_header is not None and self.chain_header in ctx.headers
        )

    def raw(self, ctx: RequestContext) -> tuple[str, ...] | None:
        values = ctx.headers.getall(self.header, ())
        if not values:
            return None
        if len(values) != 1:
            raise CertError("certificate_header_malformed", f"{self.header} sent {len(values)} times")
        chain = ",".join(ctx.headers.getall(self.chain_header, ())) if self.chain_header else ""
        return (values[0], chain)

    def parse(self, raw: tuple[str, ...]) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """(leaf, intermediates) from the header value(s). Raises CertError."""
        value, chain_value = raw
        if self.format == "xfcc":
            leaf_pem, chain_pems = parse_xfcc(value)
            chain = [c for p in chain_pems for c in _pems(p)]
            if leaf_pem is None:
                if not chain:
                    raise CertError("certificate_header_malformed", "XFCC without Cert or Chain")
                leaf, chain = chain[0], chain[1:]
            else:
                leaf = _pems(leaf_pem)[0]
                if chain and chain[0] == leaf:  # Envoy's Chain starts with the leaf
                    chain = chain[1:]
            return leaf, chain
        if self.format == "client-cert":
            leaf = _der(_sf_binary(value))
            chain = [_der(_sf_binary(x)) for x in chain_value.split(",") if x.strip()] if chain_value else []
            return leaf, chain
        certs = _pems(unquote(value).encode())  # nginx $ssl_client_escaped_cert (may hold a chain)
        return certs[0], certs[1:]


# -- revocation ------------------------------------------------------------------------------


def load_crls(paths: list[str], cas: list[x509.Certificate]) -> frozenset[tuple[bytes, int]]:
    """(issuer name DER, serial) of every revoked certificate in the CRL files. A CRL whose issuer
    is in ``cas`` must carry that CA's valid signature. Raises ValueError (config problem)."""
    revoked: set[tuple[bytes, int]] = set()
    by_subject = {}
    for ca in cas:
        by_subject.setdefault(ca.subject.public_bytes(), []).append(ca)
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ValueError(f"certificates.crl_files: cannot read {p}: {e.strerror}") from None
        crls: list[x509.CertificateRevocationList] = []
        try:
            if b"-----BEGIN X509 CRL-----" in data:
                for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S):
                    crls.append(x509.load_pem_x509_crl(block))
            else:
                crls.append(x509.load_der_x509_crl(data))
        except ValueError as e:
            raise ValueError(f"certificates.crl_files: {p} is not a CRL: {e}") from None
        for crl in crls:
            issuer = crl.issuer.public_bytes()
            signers = by_subject.get(issuer)
            if signers and not any(_crl_signed_by(crl, ca) for ca in signers):
                raise ValueError(f"certificates.crl_files: {p}: signature does not verify against its CA")
            if not signers:
                log.warning(
                    "CRL %s: issuer %s is not in the CA bundle; signature not checked",
                    p,
                    crl.issuer.rfc4514_string(),
                )
            for r in crl:
                revoked.add((issuer, r.serial_number))
    return frozenset(revoked)


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _load_cas(path: str) -> list[x509.Certificate]:
    try:
        cas = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"certificates: cannot read CA bundle {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"certificates: CA bundle {path} is not PEM certificates: {e}") from None
    return cas


# -- filter and stage ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Entry:
    identity: CertificateIdentity
    chain_keys: tuple[tuple[bytes, int], ...]  # (issuer name DER, serial) of each non-root cert
    valid_until: dt.datetime | None  # forwarded chains: re-verify after the earliest not_after


class CertificatesFilter(Filter):
    name = "certificates"

    def __init__(self, stage: CertificatesStage, mode: Mode) -> None:
        self.stage = stage
        self.mode = mode

    async def check(self, ctx: RequestContext) -> Decision:
        return self.stage.check(ctx)


class CertificatesStage(Stage):
    name = "certificates"

    def __init__(
        self,
        cfg: CertificatesConfig,
        forwarded: Forwarded | None,
        cas: list[x509.Certificate],
        revoked: frozenset[tuple[bytes, int]],
    ) -> None:
        self.cfg = cfg
        self.forwarded = forwarded
        self.revoked = revoked
        self._store = Store(cas) if cas else None
        self._ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )  # enterprise certificates carry their identity in the subject, often without a SAN
        self._tls_cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._fwd_cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._filter = CertificatesFilter(self, cfg.mode) if cfg.mode is not Mode.off else None

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        return [self._filter] if self._filter is not None else []

    def check(self, ctx: RequestContext) -> Decision:
        entry: _Entry | None = None
        fwd = self.forwarded
        if fwd is not None and ctx.from_trusted_proxy:
            try:
                raw = fwd.raw(ctx)
                if raw is not None:
                    entry = self._forwarded(raw)
            except CertError as e:
                ctx.audit["certificates"] = {"source": fwd.format, "result": e.reason}
                return Deny(
                    Problem(
                        CERTIFICATE_INVALID,
                        detail="The forwarded client certificate was not accepted.",
                        internal_reason=e.reason,
                    )
                )
        elif fwd is not None and fwd.present(ctx):
            ctx.audit["certificates"] = {"forwarded_ignored": "untrusted peer"}
        if entry is None:
            chain = ctx.tls.peer_chain_der
            if not chain:
                return SKIP
            entry = self._from_tls(chain)
        for key in entry.chain_keys:
            if key in self.revoked:
                ident = entry.identity
                ctx.audit["certificates"] = {
                    "source": ident.source,
                    "org": ident.org_number,
                    "fingerprint": ident.fingerprint_sha256,
                    "result": "certificate_revoked",
                }
                return Deny(Problem(CERTIFICATE_REVOKED, detail="The client certificate has been revoked."))
        ident = entry.identity
        ctx.certificate = ident
        ctx.audit["certificates"] = {
            "source": ident.source,
            "org": ident.org_number,
            "seid": ident.seid,
            "fingerprint": ident.fingerprint_sha256,
        }
        return ALLOW

    def _from_tls(self, chain: tuple[bytes, ...]) -> _Entry:
        digest = hashlib.sha256(b"".join(chain)).digest()
        hit = self._tls_cache.get(digest)
        if hit is not None:
            self._tls_cache.move_to_end(digest)
            return hit
        certs = [x509.load_der_x509_certificate(d) for d in chain]
        entry = _Entry(identity_of(certs[0], chain[0], "tls"), _chain_keys(certs), None)
        _put(self._tls_cache, digest, entry)
        return entry

    def _forwarded(self, raw: tuple[str, ...]) -> _Entry:
        assert self.forwarded is not None
        digest = hashlib.sha256("\x00".join(raw).encode()).digest()
        now = dt.datetime.now(dt.UTC)
        hit = self._fwd_cache.get(digest)
        if hit is not None and hit.valid_until is not None and now < hit.valid_until:
            self._fwd_cache.move_to_end(digest)
            return hit
        leaf, intermediates = self.forwarded.parse(raw)
        if self._store is None:  # build_stage refuses this configuration; keep failing closed
            raise CertError("certificate_no_ca")
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as e:
            raise CertError("certificate_chain_invalid", str(e)[:200]) from None
        chain = list(verified.chain)
        entry = _Entry(
            identity_of(leaf, leaf.public_bytes(serialization.Encoding.DER), self.forwarded.format),
            _chain_keys(chain),
            min(c.not_valid_after_utc for c in chain),
        )
        _put(self._fwd_cache, digest, entry)
        return entry


def _chain_keys(certs: list[x509.Certificate]) -> tuple[tuple[bytes, int], ...]:
    keys = []
    for c in certs:
        issuer = c.issuer.public_bytes()
        if issuer == c.subject.public_bytes() and len(certs) > 1:
            continue  # a self-signed root is not revoked by a CRL
        keys.append((issuer, c.serial_number))
    return tuple(keys)


def _put(cache: OrderedDict[bytes, _Entry], key: bytes, entry: _Entry) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.popitem(last=False)
    cache[key] = entry


def build_stage(env: BuildEnv) -> CertificatesStage | None:
    """Build at load: CA bundle, CRLs (revoked serials), header names. Raises ValueError for an
    unreadable CRL/CA file or a forwarded format without a CA bundle to verify against."""
    cfg = env.config.certificates
    if cfg.mode is Mode.off:
        return None
    tls = env.config.server.tls
    ca_path = cfg.ca_file or (tls.client_ca if tls is not None else None)
    cas = _load_cas(env.config.resolve_path(ca_path)) if ca_path else []
    forwarded = None
    if cfg.forwarded_format != "none":
        if not cas:
            raise ValueError(
                f"certificates.forwarded_format {cfg.forwarded_format!r} needs a CA bundle to verify forwarded "
                "certificates: set certificates.ca_file or server.tls.client_ca"
            )
        header = cfg.forwarded_header or DEFAULT_HEADERS[cfg.forwarded_format]
        chain_header = header + "-Chain" if cfg.forwarded_format == "client-cert" else None
        forwarded = Forwarded(cfg.forwarded_format, header, chain_header)
    revoked = load_crls([env.config.resolve_path(p) for p in cfg.crl_files], cas)
    return CertificatesStage(cfg, forwarded, cas, revoked)
