"""The rate limiter on a real Redis Cluster (three masters): exact across two gateway backends,
keys spread over the masters by their hash tag, the script loaded on a master that lost it."""

from __future__ import annotations

import asyncio
import time
import uuid

from gateway.chain import ALLOW, Deny
from tests.filters.helpers_rate_limit import ctx, stage_for


def cluster_cfg(url: str, **kw) -> dict:
    return {
        "backend": url,
        "key_prefix": "portvakt:rl",
        "timeout_ms": 3000,
        "connect_timeout_ms": 3000,
        "on_backend_error": "deny",
        **kw,
    }


async def test_exact_across_two_backends_on_a_redis_cluster(redis_cluster):
    """Two backends (two gateway processes), 600 concurrent checks over 12 integrations whose keys
    land on all three masters: exactly the burst of each integration is admitted."""
    rules = [{"per": "integration", "limit": 20, "period_seconds": 3600}]
    a, fa = stage_for(cluster_cfg(redis_cluster.url), rules)
    b, fb = stage_for(cluster_cfg(redis_cluster.url, autopipeline=False), rules)
    await a.start()
    await b.start()
    try:
        assert a.readiness() == {"redis": "ok"} and b.readiness() == {"redis": "ok"}
        integrations = [str(uuid.UUID(int=i + 1)) for i in range(12)]
        fs = [fa["rate_limit"], fb["rate_limit"]]
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(fs[i % 2].check(ctx(integration=integrations[i % 12])) for i in range(600))
        )
        elapsed = time.perf_counter() - t0
        admitted: dict[str, int] = {}
        for i, r in enumerate(results):
            if r is ALLOW:
                admitted[integrations[i % 12]] = admitted.get(integrations[i % 12], 0) + 1
            else:
                assert isinstance(r, Deny) and r.problem.reason == "rate_limited", r
        assert admitted == dict.fromkeys(integrations, 20), admitted
        # The keys sit on more than one master (each node holds only its slots' keys).
        per_node = [int(redis_cluster.cli(n, "dbsize").strip() or 0) for n in redis_cluster.nodes]
        assert sum(per_node) == 12 and sum(1 for c in per_node if c) >= 2, per_node
        print(
            f"cluster exactness: 600 checks, 12 integrations x 20 admitted, keys per master {per_node}, "
            f"{elapsed:.2f}s"
        )
    finally:
        await a.close()
        await b.close()


async def test_script_flushed_on_every_master_is_loaded_again(redis_cluster):
    stage, fs = stage_for(
        cluster_cfg(redis_cluster.url), [{"per": "integration", "limit": 5, "period_seconds": 60}]
    )
    await stage.start()
    try:
        assert await fs["rate_limit"].check(ctx(integration=str(uuid.UUID(int=1)))) is ALLOW
        for n in redis_cluster.nodes:
            redis_cluster.cli(n, "script", "flush")
        c = ctx(integration=str(uuid.UUID(int=2)))
        assert await fs["rate_limit"].check(c) is ALLOW
        assert c.rate_limit["source"] == "redis"
    finally:
        await stage.close()


def test_cluster_url_is_validated_and_never_echoes_the_password():
    import pytest

    from gateway.config import ConfigError, parse_config

    base = "server: {plain_http: true}\nupstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n"
    parse_config(base + "rate_limit: {backend: 'redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001'}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(
            base + "rate_limit: {backend: 'redis+cluster://:s3cret-pw@127.0.0.1:7000/3'}\n", "x.yaml"
        )
    assert any("rate_limit" in p and "no database" in p for p in e.value.problems), e.value.problems
    assert "s3cret-pw" not in "\n".join(e.value.problems)


async def test_leases_on_a_redis_cluster_batched_and_unbatched(redis_cluster):
    """lease_checks on a cluster: the lease script runs on each key's master (loaded again after a
    flush), leased checks are admitted without a round trip, and near the limit two backends stay
    exact."""
    from tests.filters.helpers_rate_limit import sample

    far = [{"per": "integration", "limit": 100_000, "period_seconds": 3600}]
    a, fa = stage_for(cluster_cfg(redis_cluster.url, lease_checks=4), far)
    b, fb = stage_for(cluster_cfg(redis_cluster.url, lease_checks=4, autopipeline=False), far)
    await a.start()
    await b.start()
    try:
        trips0 = sample("portvakt_rate_limit_backend_seconds_count")
        for f in (fa["rate_limit"], fb["rate_limit"]):
            for i in range(16):
                c = ctx(integration=str(uuid.UUID(int=100 + i % 2)))
                assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        assert sample("portvakt_rate_limit_backend_seconds_count") - trips0 == 8  # 32 checks, 4 per trip
        for n in redis_cluster.nodes:
            redis_cluster.cli(n, "script", "flush")
        a.backend._leases.clear()
        c = ctx(integration=str(uuid.UUID(int=102)))
        assert await fa["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    finally:
        await a.close()
        await b.close()
    near = [{"per": "integration", "limit": 20, "period_seconds": 3600}]
    a, fa = stage_for(cluster_cfg(redis_cluster.url, lease_checks=4), near)
    b, fb = stage_for(cluster_cfg(redis_cluster.url, lease_checks=4, autopipeline=False), near)
    await a.start()
    await b.start()
    try:
        fs = [fa["rate_limit"], fb["rate_limit"]]
        iid = str(uuid.UUID(int=200))
        results = await asyncio.gather(*(fs[i % 2].check(ctx(integration=iid)) for i in range(60)))
        assert sum(1 for r in results if r is ALLOW) == 20
    finally:
        await a.close()
        await b.close()
