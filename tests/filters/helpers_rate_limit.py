"""Shared by the rate-limit tests: configs, stages and hand-built request contexts."""

from __future__ import annotations

import time
from ipaddress import ip_address

from multidict import CIMultiDict, CIMultiDictProxy

from filters.rate_limit import RateLimitStage, build_stage
from gateway.chain import BuildEnv
from gateway.config import Config
from gateway.context import CertificateIdentity, IntegrationIdentity, RequestContext, TokenIdentity
from gateway.metrics import REGISTRY
from gateway.resources import Registry

INTEG = "6f0b5c4e-3b7a-4f1e-9d2a-1c3b5d7e9f01"
PID = "24079418176"  # a synthetic test fødselsnummer
KEY = "k" * 32


def make_config(
    rate_limit: dict | None = None, rules: list[dict] | None = None, routes: list | None = None
) -> Config:
    if routes is None:
        routes = [{"name": "api", "upstream": "u", "rate_limits": rules or []}]
    else:
        routes = [{"upstream": "u", **r} for r in routes]
    return Config.model_validate(
        {
            "server": {"plain_http": True},
            "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
            "routes": routes,
            "rate_limit": rate_limit or {},
        }
    )


def make_stage(
    rate_limit: dict | None = None, rules: list[dict] | None = None, secrets: dict | None = None
) -> RateLimitStage:
    cfg = make_config(rate_limit, rules)
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={} if secrets is None else secrets))
    assert stage is not None
    return stage


def stage_for(rate_limit=None, rules=None, secrets=None, registry: Registry | None = None):
    """A stage and its filters by name; with ``registry``, built as a reload would (sharing the
    backend with the registry's other stages)."""
    cfg = make_config(rate_limit, rules)
    env = BuildEnv(config=cfg, base_dir=".", secrets={} if secrets is None else secrets)
    if registry is not None:
        env.resources = registry.scope()
    stage = build_stage(env)
    assert stage is not None
    fs = stage.filters_for_route(cfg.routes[0])
    return stage, {f.name: f for f in fs}


def ctx(
    ip: str = "192.0.2.10",
    integration: str | None = None,
    org: str | None = None,
    pid: str | None = None,
    cert_org: str | None = None,
) -> RequestContext:
    token = None
    if org is not None or pid is not None:
        token = TokenIdentity(
            kind="idporten" if pid else "maskinporten",
            issuer="x",
            iss="x",
            exp=0,
            consumer=f"0192:{org}" if org else None,
            consumer_org=org,
            pid=pid,
        )
    return RequestContext(
        request_id="req-1",
        method="GET",
        raw_path="/",
        path="/",
        query_string="",
        host="gw",
        scheme="https",
        peer_ip=ip_address(ip),
        client_ip=ip_address(ip),
        headers=CIMultiDictProxy(CIMultiDict()),
        request=None,
        runtime=None,  # type: ignore[arg-type]
        token=token,
        integration=IntegrationIdentity(id=integration, authorized_org=org or "991825827")
        if integration
        else None,
        certificate=CertificateIdentity(
            org_number=cert_org, subject="CN=x", serial_number=1, fingerprint_sha256="00", source="tls"
        )
        if cert_org
        else None,
    )


def sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def redis_cfg(url: str, **kw) -> dict:
    return {
        "backend": url,
        "timeout_ms": 200,
        "breaker_backoff_ms": 50,
        "breaker_max_backoff_ms": 200,
        "pseudonym_key": KEY,
        **kw,
    }


async def timed(coro):
    t0 = time.monotonic()
    r = await coro
    return r, time.monotonic() - t0
