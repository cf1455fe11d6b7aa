"""filters/rate_limit when Redis fails: killed in each on_backend_error mode, slow, down at start,
dead pooled connections, unexpected batch errors, closing with checks waiting. Each check is
bounded by its timeout + 1 s (a liveness bound under load, not a speed claim)."""

from __future__ import annotations

import asyncio
import time

import pytest

from filters.rate_limit.redis_store import BREAKER_STATE, CLOSED, OPEN
from gateway.chain import ALLOW, Deny
from tests.filters.helpers_rate_limit import (
    INTEG,
    ctx,
    redis_cfg,
    sample,
    stage_for,
    timed,
)


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
            d, _ = await timed(f.check(c))  # answered (the fallback decides), never hangs
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
        for d, _ in results:
            assert d is ALLOW  # local fallback: answered while Redis still holds the command
        # The failed round trip is accounted by its batch task, a moment after the checks gave up.
        deadline = time.monotonic() + 2
        while stage.backend.state != OPEN and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert stage.backend.state == OPEN
        tried = []
        real_round_trip = stage.backend._round_trip

        async def counting(items):
            tried.append(len(items))
            return await real_round_trip(items)

        stage.backend._round_trip = counting
        c = ctx()
        d, _ = await timed(fs["rate_limit"].check(c))
        assert d is ALLOW and c.rate_limit["source"] == "local"
        assert tried == []  # breaker open: Redis is not even tried
        del stage.backend._round_trip
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
        d, _ = await timed(fs["rate_limit"].check(c))
        # answered by the fallback from the failed batch itself (not left to the 5 s timeout:
        # the batch error is what the check saw)
        assert d is ALLOW and c.rate_limit["source"] == "local"
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
