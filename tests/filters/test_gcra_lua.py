"""GCRA: the Lua script on a real redis-server and the in-process version, driven by one table.

Time is explicit: the script takes an optional ``now`` (µs) that only tests pass, so every step
is deterministic. Times sit near 2026 in µs (~1.8e15) to exercise Lua's double arithmetic.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from filters.rate_limit.gcra import GCRA_LUA, MemoryGcra, Policy, Verdict, gcra_step

T0 = 1_780_000_000_123_456  # µs


class LuaImpl:
    name = "lua"

    def __init__(self, client, sha: str) -> None:
        self.client = client
        self.sha = sha

    async def check(self, key: str, p: Policy, now: int) -> Verdict:
        raw = await self.client.evalsha(self.sha, 1, key, p.interval_us, p.tolerance_us, str(now))
        return Verdict.from_us(*raw)

    async def tat(self, key: str) -> int | None:
        v = await self.client.get(key)
        return int(v) if v is not None else None


class MemImpl:
    name = "memory"

    def __init__(self) -> None:
        self.g = MemoryGcra(clock=lambda: pytest.fail("clock must not be read when now is given"))

    async def check(self, key: str, p: Policy, now: int) -> Verdict:
        return self.g.check(key, p, now=now)

    async def tat(self, key: str) -> int | None:
        return self.g._tat.get(key)


@pytest.fixture(params=["lua", "memory"])
async def impl(request):
    if request.param == "memory":
        yield MemImpl()
        return
    srv = request.getfixturevalue("redis_server")
    client = srv.client()
    sha = await client.script_load(GCRA_LUA)
    try:
        yield LuaImpl(client, sha)
    finally:
        await client.aclose()


# (offset µs from T0, allowed, remaining, retry_after µs, reset µs)
MS = 1000
TABLE = {
    # 10 per second, burst 5: T = 100 ms, tau = 500 ms.
    "burst_then_refuse": (
        Policy.of(10, 1, burst=5),
        [
            (0, True, 4, 0, 100 * MS),
            (0, True, 3, 0, 200 * MS),
            (0, True, 2, 0, 300 * MS),
            (0, True, 1, 0, 400 * MS),
            (0, True, 0, 0, 500 * MS),
            (0, False, 0, 100 * MS, 500 * MS),
            (1, False, 0, 100 * MS - 1, 500 * MS - 1),
        ],
    ),
    # After the burst, exactly one request per emission interval.
    "steady_rate": (
        Policy.of(10, 1, burst=2),
        [
            (0, True, 1, 0, 100 * MS),
            (0, True, 0, 0, 200 * MS),
            (100 * MS - 1, False, 0, 1, 100 * MS + 1),
            (100 * MS, True, 0, 0, 200 * MS),
            (150 * MS, False, 0, 50 * MS, 150 * MS),
            (200 * MS, True, 0, 0, 200 * MS),
            (300 * MS, True, 0, 0, 200 * MS),
            (300 * MS, False, 0, 100 * MS, 200 * MS),
        ],
    ),
    # Idle for burst*T: the whole burst is back, and no more than the burst.
    "refill": (
        Policy.of(4, 2, burst=3),  # T = 500 ms
        [
            (0, True, 2, 0, 500 * MS),
            (0, True, 1, 0, 1000 * MS),
            (0, True, 0, 0, 1500 * MS),
            (0, False, 0, 500 * MS, 1500 * MS),
            (1500 * MS, True, 2, 0, 500 * MS),
            (1500 * MS, True, 1, 0, 1000 * MS),
            (1500 * MS, True, 0, 0, 1500 * MS),
            (1500 * MS, False, 0, 500 * MS, 1500 * MS),
            (10_000 * MS, True, 2, 0, 500 * MS),
        ],
    ),
    # Default burst = limit: an idle subject gets `limit` at once, then limit per period.
    "default_burst_is_limit": (
        Policy.of(3, 3),  # T = 1 s
        [
            (0, True, 2, 0, 1000 * MS),
            (0, True, 1, 0, 2000 * MS),
            (0, True, 0, 0, 3000 * MS),
            (0, False, 0, 1000 * MS, 3000 * MS),
            (3000 * MS, True, 2, 0, 1000 * MS),
        ],
    ),
    # A partial refill gives back whole emission intervals only.
    "partial_refill": (
        Policy.of(10, 1, burst=10),  # T = 100 ms
        [(0, True, 9 - i, 0, (i + 1) * 100 * MS) for i in range(10)]
        + [
            (0, False, 0, 100 * MS, 1000 * MS),
            (350 * MS, True, 2, 0, 750 * MS),
            (350 * MS, True, 1, 0, 850 * MS),
            (350 * MS, True, 0, 0, 950 * MS),
            (350 * MS, False, 0, 50 * MS, 950 * MS),
        ],
    ),
    # burst 1: strict spacing.
    "burst_one": (
        Policy.of(2, 1, burst=1),  # T = 500 ms
        [
            (0, True, 0, 0, 500 * MS),
            (499 * MS, False, 0, 1 * MS, 1 * MS),
            (500 * MS, True, 0, 0, 500 * MS),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(TABLE))
async def test_gcra_table(impl, case):
    policy, steps = TABLE[case]
    key = f"t:{{{case}}}"
    for i, (dt, allowed, remaining, retry_us, reset_us) in enumerate(steps):
        v = await impl.check(key, policy, T0 + dt)
        got = (v.allowed, v.remaining, round(v.retry_after * 1e6), round(v.reset * 1e6))
        assert got == (allowed, remaining, retry_us, reset_us), f"{impl.name} {case} step {i} at +{dt}µs"


async def test_refused_request_leaves_state_unchanged(impl):
    p = Policy.of(1, 10)
    assert (await impl.check("k", p, T0)).allowed
    before = await impl.tat("k")
    for dt in (0, 1, 5_000_000):
        assert not (await impl.check("k", p, T0 + dt)).allowed
    assert await impl.tat("k") == before == T0 + 10_000_000


async def test_subjects_are_independent(impl):
    p = Policy.of(1, 60)
    assert (await impl.check("a", p, T0)).allowed
    assert not (await impl.check("a", p, T0)).allowed
    assert (await impl.check("b", p, T0)).allowed


async def test_python_step_matches_lua_on_random_walk(redis_server):
    """Same random sequence through Lua and gcra_step: identical outputs and stored TAT."""
    import random

    rnd = random.Random(4)
    client = redis_server.client()
    sha = await client.script_load(GCRA_LUA)
    try:
        # T >= 2 s: the key's real-time TTL (>= T) cannot run out during the walk.
        for policy in (Policy.of(7, 30, burst=4), Policy.of(1000, 3600, burst=50), Policy.of(3, 7)):
            tat: int | None = None
            now = T0
            for _ in range(300):
                now += rnd.choice(
                    (0, 0, 1, 999, policy.interval_us // 3, policy.interval_us, 5 * policy.interval_us)
                )
                lua = await client.evalsha(sha, 1, "walk", policy.interval_us, policy.tolerance_us, str(now))
                py, new = gcra_step(tat, now, policy.interval_us, policy.tolerance_us)
                assert list(py) == [int(x) for x in lua]
                if new is not None:
                    tat = new
                stored = await client.get("walk")
                assert stored is not None and int(stored) == tat
            await client.delete("walk")
    finally:
        await client.aclose()


async def test_lua_sets_ttl_to_the_empty_schedule(redis_server):
    client = redis_server.client()
    sha = await client.script_load(GCRA_LUA)
    p = Policy.of(10, 60)  # T = 6 s
    try:
        await client.evalsha(sha, 1, "ttl", p.interval_us, p.tolerance_us, str(T0))
        assert 5_900 <= await client.pttl("ttl") <= 6_000
        await client.evalsha(sha, 1, "ttl", p.interval_us, p.tolerance_us, str(T0))
        assert 11_900 <= await client.pttl("ttl") <= 12_000
        # A refusal does not extend the TTL.
        for _ in range(20):
            await client.evalsha(sha, 1, "ttl", p.interval_us, p.tolerance_us, str(T0))
        assert await client.pttl("ttl") <= 60_000
        raw = await client.evalsha(sha, 1, "ttl", p.interval_us, p.tolerance_us, str(T0))
        assert raw[0] == 0
    finally:
        await client.aclose()


async def test_lua_uses_server_time_and_idle_keys_vanish(redis_server):
    """Without ``now`` the script reads Redis' clock; the key expires once its schedule is empty."""
    client = redis_server.client()
    sha = await client.script_load(GCRA_LUA)
    p = Policy.of(2, 0.1)  # T = 50 ms, burst 2
    try:
        r1 = await client.evalsha(sha, 1, "srv", p.interval_us, p.tolerance_us, "")
        r2 = await client.evalsha(sha, 1, "srv", p.interval_us, p.tolerance_us, "")
        assert (r1[0], r2[0]) == (1, 1)
        sec, usec = await client.time()
        tat = int(await client.get("srv"))
        server_now = sec * 1_000_000 + usec
        assert 0 < tat - server_now <= 2 * p.interval_us  # TAT is on the server's clock
        deadline = time.monotonic() + 5
        while await client.exists("srv") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not await client.exists("srv")
    finally:
        await client.aclose()


def test_policy_compilation():
    p = Policy.of(100, 1, burst=20)
    assert (p.interval_us, p.tolerance_us, p.burst) == (10_000, 200_000, 20)
    assert Policy.of(1000, 60).burst == 1000
    assert Policy.of(3, 1).interval_us == 333_333
    with pytest.raises(ValueError):
        Policy.of(0, 1)
    with pytest.raises(ValueError):
        Policy.of(1, 1, burst=0)


def test_memory_sweeps_idle_keys_and_bounds_memory():
    now = [T0]
    g = MemoryGcra(max_keys=100, clock=lambda: now[0], sweep_every=10_000)
    p = Policy.of(1, 1)
    for i in range(100):
        assert g.check(f"k{i}", p).allowed
    assert len(g) == 100
    now[0] += 2_000_000  # every schedule is empty now
    assert g.check("new", p).allowed
    assert len(g) == 1
    # Full of busy subjects: the oldest are dropped, the size stays bounded.
    g2 = MemoryGcra(max_keys=100, clock=lambda: T0, sweep_every=10_000)
    for i in range(1000):
        g2.check(f"k{i}", Policy.of(1, 3600))
    assert len(g2) <= 100
    assert g2.ttl_us("k999") == 3_600_000_000
