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


async def test_mutual_tls_client_certificate_by_field_and_by_url(make_redis_server, pki, tmp_path):
    """A Redis that demands a client certificate: the limiter presents one (tls_cert_file /
    tls_key_file), the session store presents one from the URL query; without one the handshake
    fails and the limiter falls back (never an unauthenticated connection)."""
    from filters.persons.config import SessionStoreConfig
    from filters.persons.store import RedisStore, StoreUnavailable

    cert, key = pki.client_cert("991825827")
    srv = make_redis_server(
        "--tls-auth-clients",
        "yes",
        tls=(pki.server_cert, pki.server_key, pki.ca_cert),
        tls_client=(cert, key),
    )
    rules = [{"per": "route", "limit": 5, "period_seconds": 60}]
    stage, fs = stage_for(
        redis_cfg(
            srv.url, tls_ca_file=pki.ca_cert, tls_cert_file=cert, tls_key_file=key, connect_timeout_ms=2000
        ),
        rules,
    )
    await stage.start()
    try:
        assert stage.backend.state == CLOSED, stage.backend.last_error
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    finally:
        await stage.close()
    stage, fs = stage_for(redis_cfg(srv.url, tls_ca_file=pki.ca_cert, connect_timeout_ms=1000), rules)
    await stage.start()
    try:
        assert stage.backend.state == OPEN
    finally:
        await stage.close()
    with_cert = f"{srv.url}?ssl_ca_certs={pki.ca_cert}&ssl_certfile={cert}&ssl_keyfile={key}"
    store = RedisStore(SessionStoreConfig(backend="redis", url=with_cert, timeout_seconds=2))
    await store.start()
    try:
        await store.set("portvakt:sess:s:x", b"v", 60)
        assert await store.get("portvakt:sess:s:x") == b"v"
    finally:
        await store.close()
    store = RedisStore(SessionStoreConfig(backend="redis", url=f"{srv.url}?ssl_ca_certs={pki.ca_cert}"))
    await store.start()
    try:
        with pytest.raises(StoreUnavailable):
            await store.get("portvakt:sess:s:x")
    finally:
        await store.close()


async def test_unix_socket(make_redis_server, tmp_path):
    import os

    sock = os.path.join(str(tmp_path), "redis.sock")
    make_redis_server("--unixsocket", sock, "--unixsocketperm", "700")
    stage, fs = stage_for(
        redis_cfg(f"unix://{sock}?db=2", timeout_ms=1000),
        [{"per": "route", "limit": 1, "period_seconds": 60}],
    )
    await stage.start()
    try:
        f = fs["rate_limit"]
        assert [await f.check(ctx()) is ALLOW for _ in range(2)] == [True, False]
        assert stage.backend.state == CLOSED
    finally:
        await stage.close()
