"""filters/rate_limit: config, decisions and headers on hand-built contexts (memory backend),
metrics and detect mode. The Redis backend: test_rate_limit_redis.py (decisions, pipelining,
reload), test_rate_limit_faults.py (Redis killed, slow, down), test_rate_limit_connections.py
(password/ACL/db, TLS, Sentinel), test_rate_limit_cluster.py, test_redis_sentinel_tls.py."""

from __future__ import annotations

import pytest

from filters.rate_limit import (
    RATE_LIMIT_UNAVAILABLE,
    RATE_LIMITED,
    PreAuthRateLimit,
    RateLimit,
    build_stage,
)
from filters.redis_client import redact
from gateway import problems
from gateway.chain import ALLOW, SKIP, BuildEnv, Deny, Mode
from gateway.config import ConfigError, parse_config
from gateway.metrics import REGISTRY
from gateway.pipeline import chain_positions
from gateway.resources import Registry
from tests.filters.helpers_rate_limit import (
    INTEG,
    KEY,
    PID,
    ctx,
    make_config,
    make_stage,
    stage_for,
)

# -- config -------------------------------------------------------------------------------------


def test_config_validation_lists_problems():
    with pytest.raises(ConfigError) as e:
        parse_config(
            "server: {plain_http: true}\n"
            "upstreams: {u: {url: 'http://127.0.0.1:9'}}\n"
            "rate_limit: {backend: 'mysql://x', key_prefix: 'a{b}'}\n"
            "routes:\n"
            "  - name: r\n    upstream: u\n    rate_limits:\n"
            "      - {per: integration, limit: 5, period_seconds: 1, stage: pre_auth}\n"
            "      - {per: client_ip, limit: 0, period_seconds: 1}\n"
        )
    text = str(e.value)
    assert "rate_limit.key_prefix" in text
    assert "routes[0].rate_limits[0]" in text and "pre_auth" in text
    assert "routes[0].rate_limits[1].limit" in text
    with pytest.raises(ConfigError, match="sentinel"):
        parse_config("server: {plain_http: true}\nrate_limit: {backend: sentinel}\n")
    with pytest.raises(ConfigError, match="rediss"):
        parse_config(
            "server: {plain_http: true}\nrate_limit: {backend: 'redis://h:1/0', tls_ca_file: ca.pem}\n"
        )


def test_password_comes_from_env(monkeypatch):
    monkeypatch.setenv("PV_TEST_REDIS_PW", "s3cr3t")
    cfg = parse_config(
        "server: {plain_http: true}\n"
        "rate_limit: {backend: 'redis://:${PV_TEST_REDIS_PW}@127.0.0.1:6379/2', password: '${PV_TEST_REDIS_PW}'}\n"
    )
    assert cfg.rate_limit.backend == "redis://:s3cr3t@127.0.0.1:6379/2"
    assert cfg.rate_limit.password == "s3cr3t"
    assert redact(cfg.rate_limit.backend) == "redis://:***@127.0.0.1:6379/2"


def test_no_rules_no_stage():
    cfg = make_config({"backend": "redis://127.0.0.1:1/0"}, [])
    assert build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})) is None
    cfg = make_config({"mode": "off"}, [{"per": "route", "limit": 1, "period_seconds": 1}])
    assert build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})) is None


def test_pseudonym_key_required_for_shared_person_limits():
    rules = [{"per": "person", "limit": 1, "period_seconds": 1}]
    with pytest.raises(ValueError, match="pseudonym_key"):
        make_stage({"backend": "redis://127.0.0.1:6379/0"}, rules)
    make_stage({"backend": "redis://127.0.0.1:6379/0", "pseudonym_key": KEY}, rules)
    make_stage({"backend": "memory"}, rules)
    # integration/organization keys need no secret
    make_stage(
        {"backend": "redis://127.0.0.1:6379/0"}, [{"per": "integration", "limit": 1, "period_seconds": 1}]
    )


def test_filters_names_positions_and_policy_names():
    stage, fs = stage_for(
        {"mode": "detect"},
        [
            {"per": "client_ip", "limit": 50, "period_seconds": 1, "burst": 100, "stage": "pre_auth"},
            {"per": "integration", "limit": 100, "period_seconds": 1, "burst": 20},
            {"per": "organization", "limit": 1000, "period_seconds": 60},
            {"per": "organization", "limit": 10, "period_seconds": 1},
            {"per": "route", "limit": 5, "period_seconds": 0.5, "name": "half"},
        ],
    )
    pre, post = fs["rate_limit_pre"], fs["rate_limit"]
    assert isinstance(pre, PreAuthRateLimit) and isinstance(post, RateLimit)
    pos = chain_positions()  # the pre-auth check before the WAF and credentials, the other after
    assert pos[pre.name] < pos["waf"] < pos["tokens"] < pos["authorize"] < pos[post.name]
    assert pre.mode is Mode.detect and post.mode is Mode.detect
    assert [r.name for r in pre.rules] == ["client_ip"]
    assert [r.policy_item for r in post.rules] == [
        '"integration";q=100;w=1',
        '"organization-2";q=1000;w=60',
        '"organization-3";q=10;w=1',
        '"half";q=10;w=1',  # a sub-second period is announced per whole second
    ]
    with pytest.raises(ValueError, match="named"):
        stage_for(
            None,
            [
                {"per": "route", "limit": 1, "period_seconds": 1, "name": "x"},
                {"per": "client_ip", "limit": 1, "period_seconds": 1, "name": "x"},
            ],
        )
    assert problems.REASONS[RATE_LIMITED][0] == 429
    assert problems.REASONS[RATE_LIMIT_UNAVAILABLE][0] == 503


# -- decisions (memory backend) -------------------------------------------------------------------


async def test_burst_then_429_with_headers_and_retry_after():
    stage, fs = stage_for(None, [{"per": "client_ip", "limit": 3, "period_seconds": 60, "stage": "pre_auth"}])
    f = fs["rate_limit_pre"]
    for remaining in (2, 1, 0):
        c = ctx()
        assert await f.check(c) is ALLOW
        assert c.response_headers["RateLimit-Policy"] == '"client_ip";q=3;w=60'
        t = (3 - remaining) * 20  # full quota back after (used * T), T = 20 s
        assert c.response_headers["RateLimit"] == f'"client_ip";r={remaining};t={t}'
    c = ctx()
    d = await f.check(c)
    assert isinstance(d, Deny)
    p = d.problem
    assert p.reason == "rate_limited" and p.status == 429
    assert p.headers["Retry-After"] == "20"
    assert c.response_headers["RateLimit"] == '"client_ip";r=0;t=60'
    assert c.rate_limit["limited_by"] == "client_ip"
    assert c.audit["rate_limit_pre"]["limited_by"] == "client_ip"
    body = p.body("req-1").decode()
    assert '"reason":"rate_limited"' in body and '"retry_after":20' in body
    # another client is not affected
    assert await f.check(ctx("192.0.2.11")) is ALLOW


async def test_retry_after_is_whole_seconds_at_least_one():
    stage, fs = stage_for(None, [{"per": "route", "limit": 100, "period_seconds": 1, "burst": 1}])
    f = fs["rate_limit"]
    assert await f.check(ctx()) is ALLOW
    d = await f.check(ctx())
    assert isinstance(d, Deny) and d.problem.headers["Retry-After"] == "1"  # 10 ms rounded up


async def test_absent_subject_does_not_apply():
    stage, fs = stage_for(
        None,
        [
            {"per": "integration", "limit": 1, "period_seconds": 60},
            {"per": "person", "limit": 1, "period_seconds": 60},
            {"per": "organization", "limit": 1, "period_seconds": 60},
        ],
    )
    f = fs["rate_limit"]
    for _ in range(3):
        c = ctx()
        assert await f.check(c) is SKIP
        assert c.response_headers == {}
    c = ctx(integration=INTEG)
    assert await f.check(c) is ALLOW
    assert c.response_headers["RateLimit-Policy"] == '"integration";q=1;w=60'  # only what applied
    assert isinstance(await f.check(ctx(integration=INTEG)), Deny)
    assert await f.check(ctx(integration=INTEG.replace("6f", "7f"))) is ALLOW


async def test_subjects_organization_person_and_keys_hide_identities():
    stage, fs = stage_for(
        {"backend": "memory"},
        [
            {"per": "organization", "limit": 1, "period_seconds": 60},
            {"per": "person", "limit": 1, "period_seconds": 60},
        ],
    )
    f = fs["rate_limit"]
    assert await f.check(ctx(org="991825827")) is ALLOW
    assert isinstance(await f.check(ctx(org="991825827")), Deny)
    assert isinstance(await f.check(ctx(cert_org="991825827")), Deny)  # the certificate's org counts too
    assert await f.check(ctx(cert_org="958935420")) is ALLOW
    assert await f.check(ctx(pid=PID)) is ALLOW
    assert isinstance(await f.check(ctx(pid=PID)), Deny)
    keys = list(stage.backend.local._tat)
    assert any("{organization:991825827}" in k for k in keys)
    assert not any(PID in k for k in keys)
    assert not any("192.0.2" in k for k in keys)
    person = [k for k in keys if k.startswith("portvakt:rl:{person:")]
    assert len(person) == 1 and person[0].endswith("}:api:person:60000000-60000000")


async def test_pre_and_post_headers_combine():
    stage, fs = stage_for(
        None,
        [
            {"per": "client_ip", "limit": 10, "period_seconds": 1, "stage": "pre_auth"},
            {"per": "integration", "limit": 100, "period_seconds": 1, "burst": 20},
        ],
    )
    c = ctx(integration=INTEG)
    assert await fs["rate_limit_pre"].check(c) is ALLOW
    assert await fs["rate_limit"].check(c) is ALLOW
    assert c.response_headers["RateLimit-Policy"] == '"client_ip";q=10;w=1, "integration";q=100;w=1'
    assert c.response_headers["RateLimit"] == '"client_ip";r=9;t=1, "integration";r=19;t=1'


async def test_ipv6_grouped_by_prefix():
    stage, fs = stage_for(None, [{"per": "client_ip", "limit": 1, "period_seconds": 60, "stage": "pre_auth"}])
    f = fs["rate_limit_pre"]
    assert await f.check(ctx("2001:db8:1:2::1")) is ALLOW
    assert isinstance(await f.check(ctx("2001:db8:1:2:ffff::9")), Deny)  # same /64
    assert await f.check(ctx("2001:db8:1:3::1")) is ALLOW
    assert await f.check(ctx("::ffff:192.0.2.99")) is ALLOW
    assert isinstance(await f.check(ctx("192.0.2.99")), Deny)  # mapped IPv4 is the same client


async def test_reload_adopts_memory_state_and_secret():
    secrets: dict = {}
    rules = [{"per": "client_ip", "limit": 1, "period_seconds": 60, "stage": "pre_auth"}]
    registry = Registry()
    s1, fs1 = stage_for(None, rules, secrets, registry)
    assert await fs1["rate_limit_pre"].check(ctx()) is ALLOW
    s2, fs2 = stage_for(None, rules, secrets, registry)
    assert s2.backend is s1.backend
    assert isinstance(await fs2["rate_limit_pre"].check(ctx()), Deny)  # a reload is no reset


async def test_metrics_exposition():
    from prometheus_client import generate_latest

    stage, fs = stage_for(None, [{"per": "route", "limit": 1, "period_seconds": 60}])
    await fs["rate_limit"].check(ctx())
    await fs["rate_limit"].check(ctx())
    text = generate_latest(REGISTRY).decode()
    assert 'portvakt_rate_limit_checks_total{result="allowed"}' in text
    assert 'portvakt_rate_limit_checks_total{result="limited"}' in text
    assert "portvakt_rate_limit_backend_seconds_bucket" in text
    assert "portvakt_rate_limit_breaker_state" in text


async def test_detect_mode_records_and_lets_through():
    from gateway.chain import run_chain

    stage, fs = stage_for({"mode": "detect"}, [{"per": "route", "limit": 1, "period_seconds": 60}])
    f = fs["rate_limit"]
    assert await run_chain((f,), ctx()) is None
    c = ctx()
    assert await run_chain((f,), c) is None  # would be a 429: recorded, not enforced
    assert [(d.filter, d.reason) for d in c.detections] == [("rate_limit", "rate_limited")]
    assert c.response_headers["RateLimit"] == '"route";r=0;t=60'
