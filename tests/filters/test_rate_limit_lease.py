"""rate_limit.lease_checks on a real Redis: a subject far from its limit takes several checks in one
round trip and the process admits the rest of them itself; near the limit every check asks Redis
(exact); nothing is ever admitted that the subject's schedule in Redis does not hold. Nothing here
asserts speed."""

from __future__ import annotations

import asyncio
import random

from filters.rate_limit import redis_store
from filters.rate_limit.gcra import GCRA_LEASE_LUA, Policy, gcra_lease_step
from gateway.chain import ALLOW, Deny
from tests.filters.helpers_rate_limit import ctx, redis_cfg, sample, stage_for

T0 = 1_780_000_000_123_456  # µs
ROUND_TRIPS = "portvakt_rate_limit_batch_checks_count"


async def test_python_lease_step_matches_lua_on_random_walk(redis_server):
    """GCRA_LEASE_LUA and gcra_lease_step: the same outputs and stored TAT on one random walk, with
    leases that fit, that would cross the floor, and refusals."""
    rnd = random.Random(14)
    client = redis_server.client()
    sha = await client.script_load(GCRA_LEASE_LUA)
    try:
        for policy, n, floor in (
            (Policy.of(1000, 3600, burst=200), 8, 128),
            (Policy.of(7, 30, burst=4), 2, 1),
            (Policy.of(100, 60), 8, 128),  # the floor is above the burst: never a lease
        ):
            tat: int | None = None
            now = T0
            leased = 0
            for _ in range(300):
                now += rnd.choice(
                    (0, 0, 1, policy.interval_us // 3, policy.interval_us, 40 * policy.interval_us)
                )
                lua = await client.evalsha(
                    sha, 1, "walk", policy.interval_us, policy.tolerance_us, str(now), n, floor
                )
                py, new = gcra_lease_step(tat, now, policy.interval_us, policy.tolerance_us, n, floor)
                assert list(py) == [int(x) for x in lua]
                leased += py[4] == n
                if new is not None:
                    tat = new
                stored = await client.get("walk")
                assert stored is not None and int(stored) == tat
                if py[4] == n:  # a lease leaves at least `floor` requests admissible
                    assert py[1] >= floor
            assert (leased > 0) == (n + floor <= policy.burst), policy
            await client.delete("walk")
    finally:
        await client.aclose()


async def test_far_from_the_limit_checks_are_leased_and_never_more_than_redis_holds(redis_server):
    limit = 100_000
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000, lease_checks=8),
        [{"per": "route", "limit": limit, "period_seconds": 3600}],
    )
    await stage.start()
    f = fs["rate_limit"]
    client = redis_server.client()
    try:
        trips0 = sample(ROUND_TRIPS)
        admitted = 0
        remaining = []
        for _ in range(40):
            c = ctx()
            assert await f.check(c) is ALLOW
            admitted += 1
            remaining.append(int(c.response_headers["RateLimit"].split("r=")[1].split(";")[0]))
        trips = sample(ROUND_TRIPS) - trips0
        assert trips == 5  # 40 checks, 8 per round trip
        assert remaining == [limit - i for i in range(1, 41)]  # as exact as without leases
        keys = [k async for k in client.scan_iter("portvakt:rl:*")]
        assert len(keys) == 1
        tat = int(await client.get(keys[0]))
        (sec, usec) = await client.time()
        now = sec * 1_000_000 + usec
        interval = 3600 * 1_000_000 // limit
        assert (tat - now) // interval >= admitted - 1  # every admitted check is on the schedule
    finally:
        await client.aclose()
        await stage.close()


async def test_near_the_limit_every_check_asks_redis_and_two_processes_stay_exact(redis_server):
    # lease_checks 8: a lease needs 128 requests still admissible after it; a limit of 100 never has.
    rules = [{"per": "route", "limit": 100, "period_seconds": 3600}]
    s1, f1 = stage_for(redis_cfg(redis_server.url, timeout_ms=2000, lease_checks=8), rules)
    s2, f2 = stage_for(redis_cfg(redis_server.url, timeout_ms=2000, lease_checks=8), rules)
    await s1.start()
    await s2.start()
    try:
        trips0 = sample(ROUND_TRIPS)
        allowed = 0
        for i in range(130):
            d = await (f1 if i % 2 else f2)["rate_limit"].check(ctx())
            allowed += d is ALLOW
            assert d is ALLOW or isinstance(d, Deny)
        assert allowed == 100
        assert sample(ROUND_TRIPS) - trips0 == 130
    finally:
        await s1.close()
        await s2.close()


async def test_a_lease_lapses_and_is_spent_while_redis_is_away(redis_server, monkeypatch):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000, lease_checks=4),
        [{"per": "route", "limit": 100_000, "period_seconds": 3600}],
    )
    await stage.start()
    f = fs["rate_limit"]
    try:
        c = ctx()
        assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        # The three leased checks are admitted even with the breaker open: Redis holds them already.
        stage.backend._set_state(redis_store.OPEN)
        for _ in range(3):
            c = ctx()
            assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        c = ctx()
        assert await f.check(c) is ALLOW and c.rate_limit["source"] == "local"  # lease spent: fallback
        stage.backend._set_state(redis_store.CLOSED)
        # A fresh lease, then its time runs out: the next check asks Redis again.
        trips0 = sample(ROUND_TRIPS)
        assert await f.check(ctx()) is ALLOW
        assert sample(ROUND_TRIPS) - trips0 == 1
        monkeypatch.setattr(redis_store, "LEASE_SECONDS", 0.0)
        for lease in stage.backend._leases.values():
            lease[1] = 0.0
        assert await f.check(ctx()) is ALLOW
        assert sample(ROUND_TRIPS) - trips0 == 2
    finally:
        await stage.close()


async def test_without_lease_checks_the_script_and_the_count_are_unchanged(redis_server):
    stage, fs = stage_for(
        redis_cfg(redis_server.url, timeout_ms=2000),
        [{"per": "route", "limit": 100_000, "period_seconds": 3600}],
    )
    await stage.start()
    try:
        trips0 = sample(ROUND_TRIPS)
        await asyncio.gather(*(fs["rate_limit"].check(ctx()) for _ in range(1)))
        for _ in range(5):
            assert await fs["rate_limit"].check(ctx()) is ALLOW
        assert sample(ROUND_TRIPS) - trips0 == 6
        assert stage.backend._leases == {}
    finally:
        await stage.close()
