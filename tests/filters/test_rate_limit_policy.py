"""Rate limits follow the policy: a reloaded limit applies from the next request (raised or
lowered, in-process and on a real Redis), the RateLimit header never announces more than the
quota, the breaker recovers within one probe interval, and the Redis pool is warm before the
first request."""

from __future__ import annotations

import asyncio
import time

import pytest

from filters.rate_limit import RateLimitConfig, build_stage
from filters.rate_limit.redis_store import CLOSED, OPEN
from gateway.chain import ALLOW, BuildEnv, Deny
from gateway.resources import Registry
from tests.filters.helpers_rate_limit import ctx, make_config

INTEG = "6f0b5c4e-3b7a-4f1e-9d2a-1c3b5d7e9f01"


def rule(limit: int, period: float, burst: int | None = None) -> list[dict]:
    r = {"per": "integration", "limit": limit, "period_seconds": period}
    if burst is not None:
        r["burst"] = burst
    return [r]


def build(rate_limit: dict, rules: list[dict], registry: Registry | None = None):
    """A stage; with ``registry``, built as a reload would (sharing the backend of its stages)."""
    cfg = make_config(rate_limit, rules)
    env = BuildEnv(config=cfg, base_dir=".", secrets={})
    if registry is not None:
        env.resources = registry.scope()
    stage = build_stage(env)
    assert stage is not None
    (flt,) = stage.filters_for_route(cfg.routes[0])
    return stage, flt


async def statuses(flt, n: int) -> list[int]:
    out = []
    for _ in range(n):
        d = await flt.check(ctx(integration=INTEG))
        out.append(200 if d is ALLOW else d.problem.status)
    return out


@pytest.fixture(params=["memory", "redis"])
async def backend(request):
    if request.param == "memory":
        yield {"backend": "memory"}
    else:
        srv = request.getfixturevalue("redis_server")
        yield {"backend": srv.url, "timeout_ms": 2000}


async def test_raised_limit_applies_from_the_next_request(backend):
    registry = Registry()
    old, flt = build(backend, rule(5, 3600), registry)
    await old.start()
    try:
        assert await statuses(flt, 6) == [200] * 5 + [429]
        d = await flt.check(ctx(integration=INTEG))
        assert isinstance(d, Deny) and int(d.problem.headers["Retry-After"]) > 600  # T = 720 s
        new, flt2 = build(backend, rule(1000, 1), registry)
        await new.start()
        try:
            assert await statuses(flt2, 50) == [200] * 50
            # And back: the old policy's state is its own (5/hour still used up).
            back, flt3 = build(backend, rule(5, 3600), registry)
            await back.start()
            assert await statuses(flt3, 1) == [429]
            await back.close()
        finally:
            await new.close()
    finally:
        await old.close()


async def test_lowered_limit_applies_from_the_next_request(backend):
    registry = Registry()
    old, flt = build(backend, rule(1000, 1), registry)
    await old.start()
    try:
        assert await statuses(flt, 20) == [200] * 20
        new, flt2 = build(backend, rule(2, 3600), registry)
        await new.start()
        try:
            assert await statuses(flt2, 5) == [200, 200, 429, 429, 429]
        finally:
            await new.close()
    finally:
        await old.close()


HEADER_CASES = [(5, 1, 10), (5, 1, 50), (3, 60, 30), (100, 0.5, 400), (5, 1, 2), (10, 60, None), (2, 2.5, 9)]


def header_numbers(c) -> tuple[int, int, int, int]:
    """(q, w, r, t) of the one policy on the response."""
    policy = c.response_headers["RateLimit-Policy"]
    state = c.response_headers["RateLimit"]
    q, w = (int(policy.split(f";{k}=")[1].split(";")[0]) for k in ("q", "w"))
    r, t = (int(state.split(f";{k}=")[1].split(";")[0]) for k in ("r", "t"))
    return q, w, r, t


@pytest.mark.parametrize("limit, period, burst", HEADER_CASES)
async def test_remaining_never_exceeds_the_quota_nor_reset_the_window(backend, limit, period, burst):
    """RateLimit is relative to the RateLimit-Policy it follows: 0 <= r <= q and 0 <= t <= w,
    whatever the burst, allowed or refused, in-process and on Redis."""
    stage, flt = build(backend, rule(limit, period, burst))
    await stage.start()
    try:
        for _ in range((burst or limit) + 2):
            c = ctx(integration=INTEG)
            await flt.check(c)
            q, w, r, t = header_numbers(c)
            assert 0 <= r <= q and 0 <= t <= w, (
                c.response_headers["RateLimit-Policy"],
                c.response_headers["RateLimit"],
            )
    finally:
        await stage.close()


@pytest.mark.parametrize("limit, period, burst", HEADER_CASES)
async def test_after_t_seconds_the_announced_remaining_is_back(limit, period, burst):
    """t is when r is back at its most (min(q, burst)), not when the whole burst above the quota
    is: on a clock the test moves, a request t seconds later sees that remaining; one second
    earlier it does not (t is rounded up to whole seconds)."""
    stage, flt = build({"backend": "memory"}, rule(limit, period, burst))
    now = [10**12]
    stage.backend.local.clock = lambda: now[0]
    for n in range(1, (burst or limit) + 2):
        for _ in range(n):  # n requests at once from idle
            c = ctx(integration=INTEG)
            await flt.check(c)
        q, _, r, t = header_numbers(c)
        most = min(q, burst or limit)
        if t > 0:
            now[0] += (t - 1) * 1_000_000
            early = ctx(integration=INTEG)
            saved = dict(stage.backend.local._tat)  # a look, not a request: the state is put back
            await flt.check(early)
            stage.backend.local._tat = saved
            assert header_numbers(early)[2] < most - 1, (n, t, early.response_headers["RateLimit"])
            now[0] += 1_000_000
        else:
            assert r == most - 1 or r == most, (n, c.response_headers["RateLimit"])
        later = ctx(integration=INTEG)
        await flt.check(later)
        assert header_numbers(later)[2] >= most - 1, (n, t, later.response_headers["RateLimit"])
        now[0] += 10**9  # idle: the schedule empties before the next round


def test_breaker_probe_interval_is_fixed_by_default():
    cfg = RateLimitConfig()
    assert cfg.breaker_max_backoff_ms == cfg.breaker_backoff_ms == 1000


async def test_breaker_recovers_within_one_probe_interval(redis_server):
    stage, flt = build(
        {
            "backend": redis_server.url,
            "timeout_ms": 300,
            "breaker_failures": 1,
            "breaker_backoff_ms": 150,
            "breaker_max_backoff_ms": 150,
            "on_backend_error": "deny",
        },
        rule(1000, 1),
    )
    await stage.start()
    b = stage.backend
    try:
        assert await statuses(flt, 3) == [200] * 3
        redis_server.kill()
        await statuses(flt, 2)
        for _ in range(100):  # several probes fail while Redis is away
            if b.state == OPEN:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert b.state != CLOSED
        assert b._backoff == pytest.approx(0.15)  # the interval did not grow during the outage
        redis_server.start()
        deadline = time.monotonic() + 15
        while b.state != CLOSED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b.state == CLOSED
        assert await statuses(flt, 3) == [200] * 3
    finally:
        await stage.close()


async def test_pool_is_warm_before_the_first_request(redis_server):
    stage, _ = build({"backend": redis_server.url, "max_inflight_batches": 4}, rule(1000, 1))
    await stage.start()
    client = redis_server.client()
    try:
        clients = await client.client_list()
        ours = [c for c in clients if c.get("name") == "portvakt-ratelimit"]
        assert len(ours) >= 4, clients
    finally:
        await client.aclose()
        await stage.close()
