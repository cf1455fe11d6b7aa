"""filters/rate_limit: the stage on hand-built contexts, with the memory backend and a real Redis.

Periods are long (minutes) wherever the count must be exact, so refill during a test is
impossible; nothing here asserts speed. Fault tests bound each check by timeout + 1 s.
"""

from __future__ import annotations

import asyncio
import time
from ipaddress import ip_address

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from filters.rate_limit import (
    RATE_LIMIT_UNAVAILABLE,
    RATE_LIMITED,
    PreAuthRateLimit,
    RateLimit,
    RateLimitStage,
    build_stage,
)
from filters.rate_limit.redis_store import BREAKER_STATE, CLOSED, OPEN
from filters.redis_client import redact
from gateway import problems
from gateway.chain import ALLOW, POS_RATE_LIMIT, POS_RATE_LIMIT_PRE, SKIP, BuildEnv, Deny, Mode
from gateway.config import Config, ConfigError, parse_config
from gateway.context import CertificateIdentity, IntegrationIdentity, RequestContext, TokenIdentity
from gateway.metrics import REGISTRY

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


def stage_for(rate_limit=None, rules=None, secrets=None):
    cfg = make_config(rate_limit, rules)
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={} if secrets is None else secrets))
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
    assert isinstance(pre, PreAuthRateLimit) and pre.position == POS_RATE_LIMIT_PRE
    assert isinstance(post, RateLimit) and post.position == POS_RATE_LIMIT
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
    s1, fs1 = stage_for(None, rules, secrets)
    assert await fs1["rate_limit_pre"].check(ctx()) is ALLOW
    s2, fs2 = stage_for(None, rules, secrets)
    s2.adopt(s1)
    assert s2.backend is s1.backend
    assert isinstance(await fs2["rate_limit_pre"].check(ctx()), Deny)  # a reload is no reset


# -- Redis backend --------------------------------------------------------------------------------


def redis_cfg(url: str, **kw) -> dict:
    return {
        "backend": url,
        "timeout_ms": 200,
        "breaker_backoff_ms": 50,
        "breaker_max_backoff_ms": 200,
        "pseudonym_key": KEY,
        **kw,
    }


async def test_redis_decisions_keys_and_ttl(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url),
        [
            {"per": "integration", "limit": 2, "period_seconds": 60},
            {"per": "person", "limit": 5, "period_seconds": 60},
        ],
    )
    await stage.start()
    client = redis_server.client()
    try:
        f = fs["rate_limit"]
        c = ctx(integration=INTEG, pid=PID)
        assert await f.check(c) is ALLOW
        assert c.rate_limit["source"] == "redis"
        assert c.response_headers["RateLimit"] == '"integration";r=1;t=30, "person";r=4;t=12'
        assert await f.check(ctx(integration=INTEG, pid=PID)) is ALLOW
        d = await f.check(ctx(integration=INTEG, pid=PID))
        assert isinstance(d, Deny) and d.problem.headers["Retry-After"] == "30"
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys[0].startswith(f"portvakt:rl:{{integration:{INTEG}}}:api:integration:")  # + policy
        assert keys[1].startswith("portvakt:rl:{person:") and PID not in keys[1]
        assert 59_000 < await client.pttl(keys[0]) <= 60_000
        assert stage.readiness() == {"redis": "ok"}
    finally:
        await client.aclose()
        await stage.close()


async def test_exact_under_concurrency_two_processes_one_redis(redis_server):
    """Two independent backends (as two gateway processes) and 300 concurrent checks for one
    integration: exactly the burst is admitted, never more."""
    rules = [{"per": "integration", "limit": 25, "period_seconds": 3600}]
    a, fa = stage_for(redis_cfg(redis_server.url, timeout_ms=2000), rules)
    b, fb = stage_for(redis_cfg(redis_server.url, timeout_ms=2000), rules)
    await a.start()
    await b.start()
    try:
        fs = [fa["rate_limit"], fb["rate_limit"]]
        results = await asyncio.gather(*(fs[i % 2].check(ctx(integration=INTEG)) for i in range(300)))
        assert sum(1 for r in results if r is ALLOW) == 25
        assert sum(1 for r in results if isinstance(r, Deny) and r.problem.reason == "rate_limited") == 275
    finally:
        await a.close()
        await b.close()


async def test_autopipelining_sends_one_round_trip_per_tick(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000), [{"per": "route", "limit": 1000, "period_seconds": 60}]
    )
    await stage.start()
    try:
        f = fs["rate_limit"]
        n0, s0 = (
            sample("portvakt_rate_limit_batch_checks_count"),
            sample("portvakt_rate_limit_batch_checks_sum"),
        )
        await asyncio.gather(*(f.check(ctx()) for _ in range(50)))
        assert sample("portvakt_rate_limit_batch_checks_count") - n0 == 1
        assert sample("portvakt_rate_limit_batch_checks_sum") - s0 == 50
    finally:
        await stage.close()


async def test_unbatched_mode_one_round_trip_per_check(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, autopipeline=False, timeout_ms=2000),
        [{"per": "route", "limit": 10, "period_seconds": 60}],
    )
    await stage.start()
    try:
        n0 = sample("portvakt_rate_limit_batch_checks_count")
        results = await asyncio.gather(*(fs["rate_limit"].check(ctx()) for _ in range(20)))
        assert sample("portvakt_rate_limit_batch_checks_count") - n0 == 20
        assert sum(1 for r in results if r is ALLOW) == 10
    finally:
        await stage.close()


async def test_noscript_reloads_the_script(redis_server):
    stage, fs = stage_for(redis_cfg(redis_server.url), [{"per": "route", "limit": 5, "period_seconds": 60}])
    await stage.start()
    client = redis_server.client()
    try:
        await client.script_flush()
        assert await fs["rate_limit"].check(ctx()) is ALLOW
        assert ctx().rate_limit == {}
        stage2, fs2 = stage_for(
            redis_cfg(redis_server.url, autopipeline=False),
            [{"per": "route", "limit": 5, "period_seconds": 60}],
        )
        await stage2.start()
        await client.script_flush()
        c = ctx()
        assert await fs2["rate_limit"].check(c) is ALLOW
        assert c.rate_limit["source"] == "redis"
        await stage2.close()
    finally:
        await client.aclose()
        await stage.close()


async def timed(coro):
    t0 = time.monotonic()
    r = await coro
    return r, time.monotonic() - t0


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
async def test_redis_killed_each_mode_bounded_wait_and_recovery(redis_server, mode):
    rules = [{"per": "integration", "limit": 3, "period_seconds": 60}]
    stage, fs = stage_for(
        redis_cfg(redis_server.url, on_backend_error=mode, timeout_ms=100, breaker_failures=2), rules
    )
    await stage.start()
    f = fs["rate_limit"]
    try:
        assert await f.check(ctx(integration=INTEG)) is ALLOW  # one used in Redis
        fb0 = sample("portvakt_rate_limit_checks_total", {"result": "fallback"})
        err0 = sample("portvakt_rate_limit_checks_total", {"result": "backend_error"})
        redis_server.kill()
        outcomes = []
        for _ in range(6):
            c = ctx(integration=INTEG)
            d, took = await timed(f.check(c))
            assert took < 0.1 + 1.0
            outcomes.append((d, c))
        assert stage.backend.state != CLOSED
        assert BREAKER_STATE.labels("closed")._value.get() == 0
        assert BREAKER_STATE.labels("open")._value.get() + BREAKER_STATE.labels("half_open")._value.get() == 1
        assert sample("portvakt_rate_limit_checks_total", {"result": "backend_error"}) - err0 >= 1
        assert sample("portvakt_rate_limit_checks_total", {"result": "fallback"}) - fb0 >= 3
        if mode == "local":
            # the same policy in-process, from an empty local state: 3 admitted, then refused
            assert [d is ALLOW for d, _ in outcomes] == [True, True, True, False, False, False]
            assert all(c.rate_limit["source"] == "local" for _, c in outcomes)
            assert outcomes[0][1].response_headers["RateLimit"] == '"integration";r=2;t=20'
            assert stage.readiness()["redis"].startswith("fallback: ")
        elif mode == "allow":
            assert all(d is ALLOW for d, _ in outcomes)
            c = outcomes[0][1]
            assert (
                c.response_headers["RateLimit-Policy"] == '"integration";q=3;w=60'
                and "RateLimit" not in c.response_headers
            )
            assert stage.readiness()["redis"].startswith("fallback: ")
        else:
            for d, _ in outcomes:
                assert (
                    isinstance(d, Deny)
                    and d.problem.reason == "rate_limit_unavailable"
                    and d.problem.status == 503
                )
                assert int(d.problem.headers["Retry-After"]) >= 1
            assert stage.readiness()["redis"].startswith("down: ")
        assert redis_server.password is None and "***" not in stage.readiness()["redis"]

        redis_server.start()  # empty: the Redis state starts afresh
        deadline = time.monotonic() + 10
        while stage.backend.state != CLOSED and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert stage.backend.state == CLOSED
        assert stage.readiness() == {"redis": "ok"}
        c = ctx(integration=INTEG)
        assert await f.check(c) is ALLOW
        assert c.rate_limit["source"] == "redis"
        assert c.response_headers["RateLimit"] == '"integration";r=2;t=20'
    finally:
        await stage.close()


async def test_slow_redis_times_out_within_bound(redis_server):
    """CLIENT PAUSE makes Redis hold our command: the check gives up after timeout_ms."""
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=100, breaker_failures=1, breaker_backoff_ms=5000),
        [{"per": "route", "limit": 100, "period_seconds": 60}],
    )
    await stage.start()
    admin = redis_server.client()
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        results = await asyncio.gather(*(timed(fs["rate_limit"].check(ctx())) for _ in range(10)))
        for d, took in results:
            assert d is ALLOW  # local fallback
            assert took < 0.1 + 1.0
        # The failed round trip is accounted by its batch task, a moment after the checks gave up.
        deadline = time.monotonic() + 2
        while stage.backend.state != OPEN and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert stage.backend.state == OPEN
        d, took = await timed(fs["rate_limit"].check(ctx()))
        assert took < 0.5  # breaker open: Redis is not even tried
        await admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        await admin.aclose()
        await stage.close()


async def test_redis_down_at_start_then_comes_up(redis_server):
    port = redis_server.port
    redis_server.kill()
    stage, fs = stage_for(
        redis_cfg(f"redis://127.0.0.1:{port}/0", connect_timeout_ms=300),
        [{"per": "route", "limit": 5, "period_seconds": 60}],
    )
    await stage.start()  # does not raise
    try:
        assert stage.backend.state == OPEN
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "local"
        redis_server.start()
        deadline = time.monotonic() + 10
        while stage.backend.state != CLOSED and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    finally:
        await stage.close()


async def test_password_acl_user_and_db(make_redis_server, monkeypatch):
    srv = make_redis_server(
        "--user",
        "portvakt",
        "on",
        ">pw-1",
        "~portvakt:*",
        "+@all",
        "--user",
        "default",
        "off",
        password="pw-1",
        username="portvakt",
    )
    rules = [{"per": "route", "limit": 5, "period_seconds": 60}]
    monkeypatch.setenv("PV_TEST_REDIS_PW", "pw-1")
    cfg = parse_config(
        "server: {plain_http: true}\n"
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\n"
        f"rate_limit: {{backend: 'redis://portvakt:${{PV_TEST_REDIS_PW}}@127.0.0.1:{srv.port}/3', timeout_ms: 500}}\n"
        "routes: [{name: api, upstream: u, rate_limits: [{per: route, limit: 5, period_seconds: 60}]}]\n"
    )
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    await stage.start()
    client = srv.client(db=3)
    try:
        c = ctx()
        assert await stage.filters_for_route(cfg.routes[0])[0].check(c) is ALLOW
        assert c.rate_limit["source"] == "redis"
        assert await client.keys("portvakt:rl:{route:-}:api:route:*")
        assert "pw-1" not in stage.readiness()["redis"]
    finally:
        await client.aclose()
        await stage.close()
    # A wrong password: no exception, breaker open, local fallback.
    bad, fs = stage_for(redis_cfg(srv.url, password="wrong", connect_timeout_ms=300), rules)
    await bad.start()
    try:
        assert bad.backend.state == OPEN
        assert "wrong" not in bad.readiness()["redis"]
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "local"
    finally:
        await bad.close()


async def test_tls_with_ca(make_redis_server, pki):
    srv = make_redis_server(tls=(pki.server_cert, pki.server_key, pki.ca_cert))
    stage, fs = stage_for(
        redis_cfg(srv.url, tls_ca_file=pki.ca_cert, connect_timeout_ms=2000),
        [{"per": "route", "limit": 5, "period_seconds": 60}],
    )
    await stage.start()
    try:
        assert stage.backend.state == CLOSED
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    finally:
        await stage.close()
    # Without the CA the server is not trusted: fallback, never an unverified connection.
    stage, fs = stage_for(
        redis_cfg(srv.url, connect_timeout_ms=1000), [{"per": "route", "limit": 5, "period_seconds": 60}]
    )
    await stage.start()
    try:
        assert stage.backend.state == OPEN and "SSL" in stage.backend.last_error.upper()
    finally:
        await stage.close()


@pytest.mark.parametrize("form", ["url", "block"])
async def test_sentinel(make_redis_server, form):
    master = make_redis_server(password="m-pw")
    sentinel = make_redis_server.sentinel_for(master, "pvmaster")
    rules = [{"per": "route", "limit": 2, "period_seconds": 60}]
    if form == "url":
        rl = redis_cfg(
            f"redis+sentinel://:m-pw@127.0.0.1:{sentinel.port}/pvmaster/1", connect_timeout_ms=2000
        )
    else:
        rl = redis_cfg(
            "sentinel",
            password="m-pw",
            connect_timeout_ms=2000,
            sentinel={"hosts": [f"127.0.0.1:{sentinel.port}"], "service_name": "pvmaster", "db": 1},
        )
    stage, fs = stage_for(rl, rules)
    await stage.start()
    client = master.client(db=1)
    try:
        f = fs["rate_limit"]
        assert [await f.check(ctx()) is ALLOW for _ in range(3)] == [True, True, False]
        assert await client.keys("portvakt:rl:{route:-}:api:route:*")
    finally:
        await client.aclose()
        await stage.close()


async def test_reload_keeps_redis_client_when_unchanged(redis_server):
    rules = [{"per": "route", "limit": 5, "period_seconds": 60}]
    s1, _ = stage_for(redis_cfg(redis_server.url), rules)
    await s1.start()
    s2, fs2 = stage_for(redis_cfg(redis_server.url, on_backend_error="deny"), rules)
    s2.adopt(s1)  # on_backend_error is not a backend setting
    assert s2.backend is s1.backend
    await s2.start()
    await s1.close()  # the old runtime retires: the adopted client stays open
    c = ctx()
    assert await fs2["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    s3, _ = stage_for(redis_cfg(redis_server.url, timeout_ms=300), rules)
    s3.adopt(s2)
    assert s3.backend is not s2.backend
    await s3.start()
    await s2.close()
    await s3.close()


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


async def test_dead_pooled_connections_after_a_restart_do_not_fail_checks(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000, max_inflight_batches=4),
        [{"per": "route", "limit": 100_000, "period_seconds": 60}],
    )
    await stage.start()
    f = fs["rate_limit"]
    try:
        pool = stage.backend.client.connection_pool
        conns = [await pool.get_connection() for _ in range(4)]  # four connected, pooled sockets
        for conn in conns:
            await pool.release(conn)
        assert await f.check(ctx()) is ALLOW
        redis_server.kill()
        redis_server.start()
        err0 = sample("portvakt_rate_limit_checks_total", {"result": "backend_error"})
        for _ in range(5):
            cs = [ctx() for _ in range(10)]
            await asyncio.gather(*(f.check(c) for c in cs))
            assert {c.rate_limit["source"] for c in cs} == {"redis"}
        assert sample("portvakt_rate_limit_checks_total", {"result": "backend_error"}) == err0
    finally:
        await stage.close()


async def test_an_unexpected_batch_error_never_leaves_a_check_waiting(redis_server, monkeypatch):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=5000), [{"per": "route", "limit": 5, "period_seconds": 60}]
    )
    await stage.start()

    async def broken(items):
        raise ValueError("bug")

    monkeypatch.setattr(stage.backend, "_round_trip", broken)
    try:
        c = ctx()
        d, took = await timed(fs["rate_limit"].check(c))
        assert d is ALLOW and c.rate_limit["source"] == "local"
        assert took < 1.0  # not the 5 s timeout: the failed batch answered at once
    finally:
        await stage.close()


async def test_closing_the_backend_answers_waiting_checks(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=5000), [{"per": "route", "limit": 5, "period_seconds": 60}]
    )
    await stage.start()
    admin = redis_server.client()
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1200", "ALL")
        c = ctx()
        task = asyncio.create_task(fs["rate_limit"].check(c))
        await asyncio.sleep(0.2)  # the batch is on the wire, held by the paused server
        assert not task.done()
        await stage.close()
        d = await asyncio.wait_for(task, 1.0)
        assert d is ALLOW and c.rate_limit["source"] == "local"
        await admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        await admin.aclose()


async def test_redis_client_uses_hiredis(redis_server):
    pytest.importorskip("hiredis")
    stage, fs = stage_for(redis_cfg(redis_server.url), [{"per": "route", "limit": 5, "period_seconds": 60}])
    await stage.start()
    try:
        pool = stage.backend.client.connection_pool
        conn = await pool.get_connection()
        assert type(conn._parser).__name__ == "_AsyncHiredisParser"
        await pool.release(conn)
    finally:
        await stage.close()


async def test_failed_reload_does_not_close_the_serving_stages_backend(redis_server):
    # A reload whose runtime fails to start is closed again (gateway/server.py): closing that
    # never-served stage must not close the Redis client of the stage still serving (its checks
    # would all fall back), nor leave that stage unable to close it later.
    rules = [{"per": "route", "limit": 50, "period_seconds": 60}]
    s1, fs1 = stage_for(redis_cfg(redis_server.url), rules)
    await s1.start()
    failed, _ = stage_for(redis_cfg(redis_server.url), rules)
    failed.adopt(s1)
    await failed.start()
    await failed.close()
    unstarted, _ = stage_for(redis_cfg(redis_server.url), rules)
    unstarted.adopt(s1)  # a reload whose build failed after this stage: never started
    await unstarted.close()
    backend = s1.backend
    assert not backend._closed
    c = ctx()
    assert await fs1["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    await s1.close()
    assert backend._closed  # the last stage holding it closes it
