"""Hand-built configs and request contexts for the audit and identity unit tests."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

import yaml

from gateway.config import Config, parse_config
from gateway.context import CertificateIdentity, IntegrationIdentity, RequestContext, TokenIdentity, WafResult
from gateway.norid import generate_fnr
from gateway.runtime import CompiledRoute

AUDIT_KEY = "test-audit-key-0123456789abcdef"
PID = generate_fnr(dt.date(1985, 5, 17), 401, synthetic=True)  # synthetic: never a real person


def make_config(
    tmp_path: Any = None, audit: dict | None = None, identity: dict | None = None, **extra: Any
) -> Config:
    doc: dict[str, Any] = {
        "server": {"plain_http": True},
        "upstreams": {"case": {"url": "http://127.0.0.1:9"}},
        "routes": [
            {
                "name": "cases",
                "upstream": "case",
                "service": "saksbehandling",
                "legal_basis": "forvaltningsloven § 13b",
                "match": {"path_prefix": "/cases"},
                "forward": {"person": True, "client_cert": True},
                "audit": {"query_string": True},
            },
            {"name": "open", "upstream": "case", "match": {"path_prefix": "/"}},
        ],
    }
    if audit is not None:
        doc["audit"] = audit
    if identity is not None:
        doc["identity"] = identity
    doc.update(extra)
    return parse_config(yaml.safe_dump(doc, allow_unicode=True))


def route(cfg: Config, name: str) -> CompiledRoute:
    rc = next(r for r in cfg.routes if r.name == name)
    return CompiledRoute(
        config=rc,
        name=rc.name,
        prefix=rc.match.path_prefix,
        methods=frozenset(rc.match.methods),
        hosts=frozenset(),
        upstream_name=rc.upstream,
        upstream=cfg.upstreams[rc.upstream],
        filters=(),
    )


def make_ctx(
    cfg: Config,
    route_name: str | None = "cases",
    request_id: str = "req-1",
    path: str = "/cases/1",
    query: str = "",
    **facts: Any,
) -> RequestContext:
    ctx = RequestContext(
        request_id=request_id,
        method="GET",
        raw_path=path,
        path=path,
        query_string=query,
        host="gw.test",
        scheme="https",
        peer_ip=ipaddress.ip_address("127.0.0.1"),
        client_ip=ipaddress.ip_address("127.0.0.1"),
        headers=None,  # type: ignore[arg-type]
        request=None,  # type: ignore[arg-type]
        runtime=None,  # type: ignore[arg-type]
    )
    if route_name is not None:
        ctx.route = route(cfg, route_name)
    for k, v in facts.items():
        setattr(ctx, k, v)
    return ctx


def maskinporten(org: str = "991825827", scopes: tuple[str, ...] = ("ks:fiks",)) -> TokenIdentity:
    return TokenIdentity(
        kind="maskinporten",
        issuer="maskinporten",
        iss="https://test.maskinporten.no/",
        exp=2_000_000_000,
        consumer=f"0192:{org}",
        consumer_org=org,
        scopes=frozenset(scopes),
        client_amr="virksomhetssertifikat",
        client_id="client-1",
    )


def idporten(pid: str = PID, acr: str = "idporten-loa-high") -> TokenIdentity:
    return TokenIdentity(
        kind="idporten", issuer="idporten", iss="https://idporten.no", exp=2_000_000_000, pid=pid, acr=acr
    )


def integration(
    iid: str = "3f1c8f6e-8d7e-4b8e-9a43-2b1e5f8c7a10", org: str = "991825827"
) -> IntegrationIdentity:
    return IntegrationIdentity(id=iid, authorized_org=org)


def certificate(org: str = "991825827", der: bytes = b"\x30\x03\x02\x01\x01") -> CertificateIdentity:
    return CertificateIdentity(
        org_number=org,
        subject="CN=test",
        serial_number=1,
        fingerprint_sha256="00",
        source="tls",
        der=der,
        seid=2,
    )


def waf(*rules: int, score: int = 5) -> WafResult:
    return WafResult(score=score, matched_rule_ids=list(rules), blocked=bool(rules))
