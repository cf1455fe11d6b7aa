"""filters/redis_client: one URL grammar and one client factory for every Redis user (rate limiter,
brute-force lockout, sessions, privileges, audit stream). Parsing is strict and never echoes a
password; the clients are built without connecting and carry explicit timeouts."""

from __future__ import annotations

import pytest

from filters.redis_client import (
    ClientOptions,
    RedisTarget,
    close_async_client,
    is_cluster,
    make_async_client,
    make_sync_client,
    parse_redis_url,
    redact,
)
from gateway.config import ConfigError, parse_config


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/2", RedisTarget("single", False, (("127.0.0.1", 6379),), 2)),
        ("redis://h", RedisTarget("single", False, (("h", 6379),), 0)),
        (
            "rediss://u:p%40ss@[::1]:7000/0?ssl_ca_certs=ca.pem&ssl_check_hostname=no",
            RedisTarget(
                "single",
                True,
                (("::1", 7000),),
                0,
                "u",
                "p@ss",
                tls_ca_file="ca.pem",
                tls_check_hostname=False,
            ),
        ),
        (
            "unix://:pw@/run/redis/redis.sock?db=4",
            RedisTarget("unix", False, (), 4, None, "pw", path="/run/redis/redis.sock"),
        ),
        (
            "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380,h3/mymaster/3",
            RedisTarget(
                "sentinel",
                False,
                (("10.0.0.1", 26379), ("::1", 26380), ("h3", 26379)),
                3,
                "app",
                "p@ss",
                service_name="mymaster",
            ),
        ),
        (
            "rediss+sentinel://:pw@h:1/svc?ssl_ca_certs=/ca.pem&ssl_certfile=c.pem&ssl_keyfile=k.pem",
            RedisTarget(
                "sentinel",
                True,
                (("h", 1),),
                0,
                None,
                "pw",
                service_name="svc",
                tls_ca_file="/ca.pem",
                tls_cert_file="c.pem",
                tls_key_file="k.pem",
            ),
        ),
        (
            "rediss+cluster://:pw@a:7000,b:7001",
            RedisTarget("cluster", True, (("a", 7000), ("b", 7001)), 0, None, "pw"),
        ),
    ],
)
def test_url_forms(url, expected):
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://s3cret-pw@h:1",  # not Redis
        "redis://:s3cret-pw@h:1/0/1",  # path beyond the db
        "redis://:s3cret-pw@h:1/x",  # db not a number
        "redis://:s3cret-pw@h:99999/0",  # port out of range
        "redis://:s3cret-pw@h:port/0",
        "redis://:s3cret-pw@a:1,b:2/0",  # several hosts need sentinel/cluster
        "redis://:s3cret-pw@h:1/0?ssl_ca_certs=ca.pem",  # TLS option without TLS
        "rediss://:s3cret-pw@h:1/0?ssl_ca_cert=ca.pem",  # misspelt: never silently "no CA"
        "rediss://:s3cret-pw@h:1/0?ssl_cert_reqs=none",  # verification cannot be switched off
        "rediss://:s3cret-pw@h:1/0?ssl_certfile=c.pem",  # certificate without its key
        "rediss://:s3cret-pw@h:1/0?ssl_check_hostname=maybe",
        "redis+sentinel://:s3cret-pw@h:1",  # no service name
        "redis+sentinel://:s3cret-pw@h:1/svc/0/9",
        "redis+cluster://:s3cret-pw@h:1/3",  # a cluster has only db 0
        "redis+cluster://:s3cret-pw@",
        "unix://:s3cret-pw@relative.sock",
        "redis://:s3cret#pw@h:1/0",  # an unencoded '#' would cut the password
        "redis://:pw?s3cret@h:1/0",  # an unencoded '?': the tail is never echoed as a "parameter"
        "redis://:pw?ssl_s3cret@h:1/0",
        "redis://:pw?s3cret=x@h:1/0",
    ],
)
def test_bad_urls_are_refused_without_echoing_the_password(url):
    with pytest.raises(ValueError) as e:
        parse_redis_url(url)
    assert "s3cret" not in str(e.value)


def test_redact():
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("rediss+cluster://u:pw@a:1,b:2") == "rediss+cluster://u:***@a:1,b:2"
    assert redact("redis+sentinel://u:p@ss@h:1/svc") == "redis+sentinel://u:***@h:1/svc"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert "pw" not in redact("redis://u:pw@h:1/0")
    # A password with '/', '?' or '#' unencoded: never shown (urlsplit would stop inside it).
    for url in ("redis://:s3/cret@h:1/0", "redis://:s3?cret@h:1/0", "redis://u:s3#cret@h:1/0", "s3cret@h"):
        assert "cret" not in redact(url), redact(url)
    assert redact("redis://u:a/b@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.parametrize(
    "section",
    [
        "rate_limit: {backend: '%s'}\nroutes: [{name: r, upstream: u}]\n",
        "audit: {redis: {url: '%s'}}\nroutes: [{name: r, upstream: u}]\n",
        "integrations_policy: {brute_force: {redis_url: '%s'}}\nroutes: [{name: r, upstream: u}]\n",
    ],
)
def test_every_component_validates_its_url_at_load(section):
    base = "server: {plain_http: true}\nupstreams: {u: {url: 'http://127.0.0.1:9'}}\n"
    for good in ("redis+cluster://:pw@127.0.0.1:7000", "rediss+sentinel://:pw@127.0.0.1:1/svc/0"):
        parse_config(base + section % good)
    with pytest.raises(ConfigError) as e:
        parse_config(base + section % "redis+cluster://:s3cret-pw@127.0.0.1:7000/3", "x.yaml")
    assert "no database" in "\n".join(e.value.problems), e.value.problems
    assert "s3cret-pw" not in "\n".join(e.value.problems)


async def test_clients_of_each_kind_are_built_without_connecting():
    opts = ClientOptions(timeout=0.25, connect_timeout=0.5, client_name="t")
    single = make_async_client(parse_redis_url("redis://:pw@127.0.0.1:1/3"), opts)
    kw = single.connection_pool.connection_kwargs
    assert (kw["socket_timeout"], kw["socket_connect_timeout"], kw["db"], kw["password"]) == (
        0.25,
        0.5,
        3,
        "pw",
    )
    assert kw["retry"]._retries == 0  # no hidden retries
    await close_async_client(single)
    tls = make_async_client(
        parse_redis_url("rediss://127.0.0.1:1/0?ssl_ca_certs=ca.pem&ssl_check_hostname=no"),
        ClientOptions(timeout=1, resolve_path=lambda p: "/conf/" + p),
    )
    kw = tls.connection_pool.connection_kwargs
    assert (kw["ssl_ca_certs"], kw["ssl_check_hostname"], kw["ssl_cert_reqs"]) == (
        "/conf/ca.pem",
        False,
        "required",
    )
    await close_async_client(tls)
    sentinel = make_async_client(parse_redis_url("rediss+sentinel://:pw@127.0.0.1:1/svc/2"), opts)
    pool = sentinel.connection_pool
    assert pool.service_name == "svc" and pool.connection_kwargs["db"] == 2
    assert "SSL" in pool.connection_class.__name__
    (s,) = pool.sentinel_manager.sentinels
    assert s.connection_pool.connection_kwargs["socket_timeout"] == 0.5  # the connect bound
    await close_async_client(sentinel)
    cluster = make_async_client(parse_redis_url("redis+cluster://127.0.0.1:1,127.0.0.1:2"), opts)
    assert is_cluster(cluster)
    await close_async_client(cluster)
    sync = make_sync_client(parse_redis_url("redis://127.0.0.1:1/5"), opts)
    assert sync.connection_pool.connection_kwargs["db"] == 5
    sync.close()
