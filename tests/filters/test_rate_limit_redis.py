"""filters/rate_limit on a real Redis: decisions, keys and TTLs, exactness across two backends,
auto-pipelining, NOSCRIPT, reload keeping the client, hiredis. Periods are long wherever the count
must be exact; nothing asserts speed."""

from __future__ import annotations

import asyncio

import pytest

from gateway.chain import ALLOW, Deny
from gateway.resources import Registry
from tests.filters.helpers_rate_limit import (
    INTEG,
    PID,
    ctx,
    redis_cfg,
    sample,
    stage_for,
)

# -- Redis backend --------------------------------------------------------------------------------


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


async def test_reload_keeps_redis_client_when_unchanged(redis_server):
    rules = [{"per": "route", "limit": 5, "period_seconds": 60}]
    registry = Registry()
    s1, _ = stage_for(redis_cfg(redis_server.url), rules, registry=registry)
    await s1.start()
    # on_backend_error is not a backend setting
    s2, fs2 = stage_for(redis_cfg(redis_server.url, on_backend_error="deny"), rules, registry=registry)
    assert s2.backend is s1.backend
    await s2.start()
    await s1.close()  # the old runtime retires: the shared client stays open
    c = ctx()
    assert await fs2["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    s3, _ = stage_for(redis_cfg(redis_server.url, timeout_ms=300), rules, registry=registry)
    assert s3.backend is not s2.backend
    await s3.start()
    await s2.close()
    await s3.close()


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
    registry = Registry()
    s1, fs1 = stage_for(redis_cfg(redis_server.url), rules, registry=registry)
    await s1.start()
    failed, _ = stage_for(redis_cfg(redis_server.url), rules, registry=registry)
    await failed.start()
    await failed.close()
    unstarted, _ = stage_for(redis_cfg(redis_server.url), rules, registry=registry)
    await unstarted.close()  # a reload whose build failed after this stage: never started
    backend = s1.backend
    assert not backend._closed
    c = ctx()
    assert await fs1["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "redis"
    await s1.close()
    assert backend._closed  # the last stage holding it closes it


async def test_the_batcher_holds_its_connections_and_gives_them_back_clean(redis_server):
    """Batches reuse held connections (no pool get/release per batch) without a socket timeout of
    their own (the batch deadline bounds them); never all of the pool, so a script load still gets
    one; a failed batch returns every held connection to the pool with its timeout restored; closing
    the backend returns them too."""
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000, max_connections=2, max_inflight_batches=2),
        [{"per": "route", "limit": 100_000, "period_seconds": 60}],
    )
    await stage.start()
    f = fs["rate_limit"]
    b = stage.backend
    pool = b.client.connection_pool
    try:
        for _ in range(3):
            cs = [ctx() for _ in range(5)]
            assert all(d is ALLOW for d in await asyncio.gather(*(f.check(c) for c in cs)))
            assert {c.rate_limit["source"] for c in cs} == {"redis"}
        # Two batches on the wire at once (the server paused under the first) use both pool
        # connections; afterwards only max_connections - 1 stay held.
        admin = redis_server.client()
        await admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
        first = asyncio.create_task(f.check(ctx()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(f.check(ctx()))
        assert await first is ALLOW and await second is ALLOW
        assert len(b._held) == 1  # max_connections - 1
        held = b._held[0]
        assert held.socket_timeout is None and held in pool._in_use_connections
        # The pool's other connection still serves a script load while the batcher holds one.
        await asyncio.wait_for(b._load_script(), 2)
        # A held connection the server dropped: the batch retries on a pool connection (the pool
        # may hand out the same object, reconnected), and what is not held has its timeout back.
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await admin.aclose()
        c = ctx()
        assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        assert len(b._held) == 1 and b._held[0].socket_timeout is None
        others = [x for x in [*pool._available_connections, *pool._in_use_connections] if x not in b._held]
        assert others and all(x.socket_timeout == 2.0 for x in others)  # the pool's own, restored
        taken = await b._take()
        assert taken.socket_timeout is None
        await b._give_back(taken, failed=True)
        assert taken.socket_timeout == 2.0 and not b._held  # failed: all of them back to the pool
    finally:
        await stage.close()
    assert b._held == [] and held.socket_timeout == 2.0
