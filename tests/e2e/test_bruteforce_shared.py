"""Brute-force limits that hold across the fleet: with ``brute_force.redis_url`` two workers of one
gateway, and two separate gateway processes, on one real redis-server grant exactly the documented
number of password guesses (``max_failures`` per (id, client IP)) and no more, even when the guesses
arrive at once on separate connections."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from tests.e2e.helpers_identity import GRANTING_ORG, ORG_URL, PASSWORD, bearer, creds, identity_config

URL = ORG_URL.format(org=GRANTING_ORG)
MAX_FAILURES = 6
GUESSES = 24


def policy(redis_url: str | None) -> dict:
    bf = {
        "free_failures": MAX_FAILURES,
        "max_failures": MAX_FAILURES,
        "ip_max_failures": 1000,
        "id_max_failures": 1000,
        "lockout_seconds": 300,
        "decay_seconds": 3600,
    }
    if redis_url is not None:
        bf["redis_url"] = redis_url
    return {"brute_force": bf, "failure_cache_seconds": 0}


async def guess(gw, token: str, password: str) -> int:
    # A new connection for every guess: the kernel spreads connections over the workers.
    conn = aiohttp.TCPConnector(ssl=gw.ssl_context(), force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(gw.url + URL, headers={**bearer(token), **creds(password=password)}) as r:
            await r.read()
            return r.status


async def storm(gateways: list, token: str) -> Counter:
    tasks = [guess(gateways[i % len(gateways)], token, f"gjett-{i}") for i in range(GUESSES)]
    return Counter(await asyncio.gather(*tasks))


async def test_two_workers_on_one_redis_allow_exactly_max_failures(
    start_gateway, upstream, issuer, redis_server
):
    cfg = identity_config(upstream.url, issuer, integrations_policy=policy(redis_server.url))
    gw = await start_gateway(cfg, workers=2, wait_ready=False)
    await gw.wait_ready(timeout=90)  # two workers start slowly on a loaded machine
    token = issuer.mint(scope="ks:fiks")
    got = await storm([gw], token)
    assert got == {401: MAX_FAILURES, 429: GUESSES - MAX_FAILURES}, got
    # Locked on every worker, even for the right password.
    for _ in range(4):
        assert await guess(gw, token, PASSWORD) == 429
    assert upstream.started == 0


async def test_two_gateway_processes_on_one_redis_allow_exactly_max_failures(
    start_gateway, upstream, issuer, shared_redis
):
    """On a single Redis and on a three-master Redis Cluster (the keys of one attempt share a
    hash tag, so the script runs on one slot)."""
    cfg = identity_config(upstream.url, issuer, integrations_policy=policy(shared_redis.url))
    gw1 = await start_gateway(cfg)
    gw2 = await start_gateway(cfg)
    token = issuer.mint(scope="ks:fiks")
    got = await storm([gw1, gw2], token)
    assert got == {401: MAX_FAILURES, 429: GUESSES - MAX_FAILURES}, got
    assert await guess(gw1, token, PASSWORD) == 429 and await guess(gw2, token, PASSWORD) == 429
    # The counters live in Redis, keyed without the client address in clear.
    keys = [k.decode() for k in await shared_redis.keys("{portvakt:bf}:*")]
    assert keys and not any("127.0.0.1" in k for k in keys), keys


async def test_without_redis_each_process_counts_alone(start_gateway, upstream, issuer):
    """The embedded default: two processes without Redis each allow max_failures (what the
    shared store is for). Also the control that the storm really reaches both processes."""
    cfg = identity_config(upstream.url, issuer, integrations_policy=policy(None))
    gw1 = await start_gateway(cfg)
    gw2 = await start_gateway(cfg)
    got = await storm([gw1, gw2], issuer.mint(scope="ks:fiks"))
    assert got == {401: 2 * MAX_FAILURES, 429: GUESSES - 2 * MAX_FAILURES}, got


async def test_redis_down_falls_back_in_process_and_recovers(start_gateway, upstream, issuer, redis_server):
    cfg = identity_config(upstream.url, issuer, integrations_policy=policy(redis_server.url))
    gw = await start_gateway(cfg)
    token = issuer.mint(scope="ks:fiks")
    assert await guess(gw, token, PASSWORD) == 200
    redis_server.kill()
    # Still answered (never a 5xx): the in-process tracker counts for this process.
    got = Counter([await guess(gw, token, f"feil-{i}") for i in range(MAX_FAILURES + 2)])
    assert got == {401: MAX_FAILURES, 429: 2}, got
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/readyz") as r:
            body = await r.json()
    assert any("fallback" in str(v) for v in body.values()), body
    redis_server.start()
    await asyncio.sleep(1.2)  # the fallback answers alone for one second after a failure
    # Redis is empty again (not persisted) and answers from the next request on.
    assert await guess(gw, token, "noch-ein-versuch") == 401
    client = redis_server.client()
    try:
        assert await client.keys("{portvakt:bf}:*")
    finally:
        await client.aclose()
