"""A rate limit raised and lowered by reload under load takes effect from the next request: the
real gateway process, in-process and on a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.helpers_identity import (
    GRANTING_ORG,
    ORG_URL,
    bearer,
    call,
    creds,
    identity_config,
    innsyn_route,
)

URL = ORG_URL.format(org=GRANTING_ORG)


def config(upstream, issuer, backend: str, limit: int, period: float) -> dict:
    route = innsyn_route()
    route["rate_limits"] = [{"per": "integration", "limit": limit, "period_seconds": period}]
    cfg = identity_config(upstream.url, issuer, rate_limit={"backend": backend, "timeout_ms": 1000})
    cfg["routes"] = [route]
    return cfg


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_limit_raised_and_lowered_by_reload_under_load(
    start_gateway, upstream, issuer, redis_server, backend
):
    url = "memory" if backend == "memory" else redis_server.url
    cfg = config(upstream, issuer, url, 5, 3600)
    gw = await start_gateway(cfg)
    headers = {**bearer(issuer.mint(scope="ks:fiks")), **creds()}
    samples: list[tuple[float, int, str]] = []  # (started, status, Retry-After)
    stop = asyncio.Event()

    async def load(s) -> None:
        n = 0
        while not stop.is_set() and n < 2000:  # bounded
            n += 1
            t0 = time.monotonic()
            st, _, h = await call(s, gw.url + URL, headers)
            samples.append((t0, st, h.get("Retry-After", "")))
            await asyncio.sleep(0.005)

    sessions = [gw.session() for _ in range(3)]
    tasks = [asyncio.create_task(load(s)) for s in sessions]
    try:
        for _ in range(400):  # until the 5/hour allowance is used up
            if any(st == 429 for _, st, _ in samples):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # requests admitted before the first 429 may still be in flight
        assert sum(st == 200 for _, st, _ in samples) == 5
        assert max(int(ra) for _, st, ra in samples if st == 429) > 600  # an hour's schedule ahead
        gw.write_config(config(upstream, issuer, url, 1000, 1))
        assert await gw.reload() == "success"
        raised = time.monotonic()
        await asyncio.sleep(0.5)
        lowering = time.monotonic()  # from here the old (raised) runtime may be replaced at any moment
        gw.write_config(config(upstream, issuer, url, 2, 3600))
        assert await gw.reload() == "success"
        lowered = time.monotonic()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close()
    after_raise = [st for t, st, _ in samples if raised <= t < lowering]
    assert after_raise and all(st == 200 for st in after_raise), after_raise
    after_lower = [st for t, st, _ in samples if t >= lowered]
    assert len(after_lower) > 5
    assert sum(st == 200 for st in after_lower) <= 2, after_lower  # the new burst, then refused
    assert all(st in (200, 429) for st in after_lower)
