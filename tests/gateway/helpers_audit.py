"""Hand-built configs and request contexts for the audit and identity unit tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519
from prometheus_client import generate_latest

from gateway.audit import AuditSink, build_audit, rotated_files
from gateway.chain import BuildEnv
from gateway.config import Config, parse_config
from gateway.context import CertificateIdentity, IntegrationIdentity, RequestContext, TokenIdentity, WafResult
from gateway.metrics import REGISTRY
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


# ------------------------------------------------------------------ the audit trail in unit tests

KEY = AUDIT_KEY.encode()


def audit_cfg(tmp_path: Path, **kw) -> dict:
    return {"path": str(tmp_path / "audit.jsonl"), "key": AUDIT_KEY, "batch_interval_ms": 1, **kw}


async def started(cfg, previous: AuditSink | None = None) -> AuditSink:
    sink = build_audit(BuildEnv(config=cfg, base_dir=".", secrets={}))
    if previous is not None:
        sink.adopt(previous)
    await sink.start()
    return sink


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def trail(tmp_path: Path) -> list[str]:
    p = str(tmp_path / "audit.jsonl")
    return rotated_files(p) + [p]


def requests_of(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["type"] == "request"]


def outcome(ctx, status, decision, reason=None):
    ctx.status, ctx.decision, ctx.reason = status, decision, reason
    return ctx


def metric(name: str, **labels) -> float:
    text = generate_latest(REGISTRY).decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


async def wait_for(cond, timeout=8.0):
    for _ in range(int(timeout / 0.02)):
        if await cond():
            return True
        await asyncio.sleep(0.02)
    return False


# ------------------------------------------------------------------ an auditor's key pair


def auditor_keys(tmp_path, kind="x25519"):
    if kind == "x25519":
        priv = x25519.X25519PrivateKey.generate()
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / f"auditor-{kind}.pub"
    pub.write_bytes(
        priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, str(pub)
