"""filters/rate_limit connecting to Redis: password from the environment, ACL user and database,
TLS with the dev CA (and refusal without it), Sentinel by URL and by block."""

from __future__ import annotations

import pytest

from filters.rate_limit import (
    build_stage,
)
from filters.rate_limit.redis_store import CLOSED, OPEN
from gateway.chain import ALLOW, BuildEnv
from gateway.config import parse_config
from tests.filters.helpers_rate_limit import (
    ctx,
    redis_cfg,
    stage_for,
)


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
