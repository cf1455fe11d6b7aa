"""F06 (red team): one address spraying random ``IntegrasjonId``s. Unknown ids run no argon2 (their
401 is padded by a sleep), failures are counted per address across ids, so the address gets 429
after ``ip_free_failures`` + 1 failures (memory and Redis alike), and a legitimate integration's
first, uncached call from another address still succeeds while the spray is going on."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from tests.e2e.helpers_identity import GRANTING_ORG, ORG_URL, bearer, creds, identity_config

URL = ORG_URL.format(org=GRANTING_ORG)
ARGON2 = "portvakt_argon2_verifications_total"
IP_FREE = 4  # the documented rule: ip_free_failures failures free, the next one starts a delay
SPRAY = 12
ATTACKER, LEGIT = "127.0.0.3", "127.0.0.2"


def policy(redis_url: str | None) -> dict:
    bf = {"ip_free_failures": IP_FREE, "ip_max_failures": 20, "lockout_seconds": 300, "decay_seconds": 3600}
    if redis_url is not None:
        bf["redis_url"] = redis_url
    return {"brute_force": bf, "failure_cache_seconds": 0}


async def send(gw, source: str, headers: dict[str, str]) -> tuple[int, dict]:
    conn = aiohttp.TCPConnector(ssl=gw.ssl_context(), force_close=True, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(gw.url + URL, headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as r:
            await r.read()
            return r.status, dict(r.headers)


def random_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_spraying_ids_from_one_address_gets_429_and_the_real_integration_passes(
    start_gateway, upstream, issuer, redis_server, shared
):
    cfg = identity_config(
        upstream.url, issuer, integrations_policy=policy(redis_server.url if shared else None)
    )
    gw = await start_gateway(cfg)
    token = issuer.mint(scope="ks:fiks")
    spray = [send(gw, ATTACKER, {**bearer(token), **creds(random_id(i), "x")}) for i in range(SPRAY)]
    legit = send(gw, LEGIT, {**bearer(token), **creds()})  # first call: not cached, needs argon2
    *sprayed, (legit_status, _) = await asyncio.gather(*spray, legit)
    got = Counter(status for status, _ in sprayed)
    assert got == {401: IP_FREE + 1, 429: SPRAY - IP_FREE - 1}, got
    assert legit_status == 200
    assert all(int(h["Retry-After"]) >= 1 for status, h in sprayed if status == 429)
    # The address stays refused for any id, while the real integration keeps working elsewhere.
    assert (await send(gw, ATTACKER, {**bearer(token), **creds(random_id(99), "x")}))[0] == 429
    assert (await send(gw, LEGIT, {**bearer(token), **creds()}))[0] == 200
    # Unknown ids burnt no argon2: the only verification was the real integration's.
    assert await gw.metric(ARGON2, {"result": "dummy"}) == 0
    assert await gw.metric(ARGON2, {"result": "match"}) == 1
    assert (
        await gw.metric("portvakt_integration_credential_cache_total", {"result": "unknown"}) == IP_FREE + 1
    )
    assert len(upstream.requests) == 2


async def test_unknown_ids_from_many_addresses_cost_no_argon2(start_gateway, upstream, issuer):
    """Distinct ids from distinct addresses (each under its own back-off): all 401, none runs argon2."""
    gw = await start_gateway(identity_config(upstream.url, issuer, integrations_policy=policy(None)))
    token = issuer.mint(scope="ks:fiks")
    got = await asyncio.gather(
        *(send(gw, f"127.0.1.{i + 1}", {**bearer(token), **creds(random_id(i), "x")}) for i in range(10))
    )
    assert [status for status, _ in got] == [401] * 10
    assert await gw.metric(ARGON2, {"result": "dummy"}) == 0
    assert await gw.metric(ARGON2, {"result": "mismatch"}) == 0
