"""filters/integrations/lockout.py through the filter: backoff, lockouts per (id, IP), per IP and per
id, decay, the known-good exemption, reloads."""

from __future__ import annotations

import asyncio

import pytest

from filters.integrations import clock as integrations_clock
from gateway.chain import ALLOW
from gateway.metrics import REGISTRY
from tests.filters.helpers_identity import (
    PASSWORD,
    make_config,
)
from tests.filters.helpers_integrations import BF, Clock, attempt, build, retry_after


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(integrations_clock, "now", c)
    return c


# --- brute force -----------------------------------------------------------------------------


async def test_backoff_slows_then_locks_then_releases(clock):
    slow_decay = {**BF, "decay_seconds": 1000}
    stage, flt = build(
        make_config(integrations_policy={"brute_force": slow_decay, "failure_cache_seconds": 0})
    )
    # Free failures: answered at once, one after the other.
    for _ in range(2):
        assert (await attempt(flt)).problem.reason == "integration_auth_failed"
    # Third failure: now the next attempt must wait 1 s, then 2 s after the fourth.
    assert (await attempt(flt)).problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt)) == 1
    clock.t += 1
    assert (await attempt(flt)).problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt)) == 2
    clock.t += 2
    # Fifth failure: locked out for lockout_seconds, even with the right password.
    assert (await attempt(flt)).problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt)) == 60
    ra = retry_after(await attempt(flt, password=PASSWORD))
    assert ra is not None and ra <= 60
    calls = stage.verifier.hasher.calls
    clock.t += 30
    assert retry_after(await attempt(flt, password=PASSWORD)) == 30
    assert stage.verifier.hasher.calls == calls  # refused attempts never reach argon2
    # The lockout ends on time (refused attempts did not extend it) and the right password works.
    clock.t += 30
    assert await attempt(flt, password=PASSWORD) is ALLOW
    # Success cleared the pair's count: failures start from free again.
    assert (await attempt(flt)).problem.reason == "integration_auth_failed"
    assert (await attempt(flt)).problem.reason == "integration_auth_failed"


async def test_counts_decay_over_time(clock):
    _, flt = build(make_config(integrations_policy={"brute_force": BF}))
    for i in range(2):
        await attempt(flt, password=f"feil{i}")
    clock.t += 20  # two failures drained at one per decay_seconds (10 s)
    for i in range(2):
        d = await attempt(flt, password=f"igjen{i}")
        assert d.problem.reason == "integration_auth_failed"
    d = await attempt(flt, password="tredje")
    assert d.problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt, password="fjerde")) == 1


async def test_one_ip_spraying_unknown_ids_backs_off_then_gets_429(clock):
    """F06: failures are counted per address across ids, unknown ids included: after
    ip_free_failures the address waits 1 s, 2 s, ... (429 meanwhile), then ip_max_failures locks it."""
    bf = {**BF, "ip_free_failures": 3, "ip_max_failures": 8, "decay_seconds": 1000}
    stage, flt = build(make_config(integrations_policy={"brute_force": bf}))
    ids = iter(f"{i:08x}-0000-4000-8000-000000000000" for i in range(100))
    for _ in range(4):  # 3 free + the 4th, which starts a 1 s delay
        assert (await attempt(flt, iid=next(ids))).problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt, iid=next(ids))) == 1
    assert retry_after(await attempt(flt, iid=next(ids), password=PASSWORD)) == 1  # every id waits
    clock.t += 1
    assert (await attempt(flt, iid=next(ids))).problem.reason == "integration_auth_failed"
    assert retry_after(await attempt(flt, iid=next(ids))) == 2
    assert await attempt(flt, password=PASSWORD, ip="198.51.100.7") is ALLOW  # other addresses unaffected
    assert stage.verifier.hasher.calls == 1  # the unknown ids ran no argon2


async def test_concurrent_spray_from_one_address_admits_exactly_ip_free_plus_one(clock):
    bf = {**BF, "ip_free_failures": 3, "ip_max_failures": 8}
    _, flt = build(make_config(integrations_policy={"brute_force": bf}))
    got = await asyncio.gather(*(attempt(flt, iid=f"{i:08x}-0000-4000-8000-000000000000") for i in range(12)))
    assert sum(1 for d in got if d.problem.status == 401) == 4
    assert sum(1 for d in got if d.problem.status == 429) == 8


async def test_a_success_lifts_the_address_delay_it_no_longer_earns(clock):
    bf = {**BF, "ip_free_failures": 2, "ip_max_failures": 8, "decay_seconds": 1000}
    _, flt = build(make_config(integrations_policy={"brute_force": bf}))
    for i in range(2):
        await attempt(flt, iid=f"{i:08x}-0000-4000-8000-000000000000")
    # The right password is admitted as the 3rd counted attempt (which would start a delay), succeeds,
    # and its refund brings the address back to 2: no delay for its next call.
    assert await attempt(flt, password=PASSWORD) is ALLOW
    assert await attempt(flt, password=PASSWORD) is ALLOW


async def test_one_ip_guessing_many_ids_is_locked_out(clock):
    _, flt = build(make_config(integrations_policy={"brute_force": BF}))
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(8)]
    for iid in ids:
        assert (await attempt(flt, iid=iid)).problem.reason == "integration_auth_failed"
    # The IP is locked for every id, including the real one with its right password.
    assert retry_after(await attempt(flt, password=PASSWORD)) == 60
    # Another IP is unaffected.
    assert await attempt(flt, password=PASSWORD, ip="198.51.100.7") is ALLOW


async def test_attacker_cannot_lock_the_integration_out_of_its_own_address(clock):
    _, flt = build(make_config(integrations_policy={"brute_force": BF}))
    home = "203.0.113.5"
    assert await attempt(flt, password=PASSWORD, ip=home) is ALLOW
    # Failures for this id from many other addresses reach the per-id threshold.
    for i in range(12):
        await attempt(flt, password=f"gjett{i}", ip=f"198.51.100.{i + 1}")
    assert retry_after(await attempt(flt, password=PASSWORD, ip="192.0.2.200")) == 60  # new address: refused
    for _ in range(5):
        assert await attempt(flt, password=PASSWORD, ip=home) is ALLOW  # its own address: never blocked


async def test_lockout_survives_reload(clock):
    secrets: dict = {}
    cfg = make_config(integrations_policy={"brute_force": BF})
    old, old_flt = build(cfg, secrets)
    for i in range(5):
        clock.t += 5
        await attempt(old_flt, password=f"feil{i}")
    assert retry_after(await attempt(old_flt)) is not None
    new, new_flt = build(cfg, secrets)
    new.adopt(old)
    assert retry_after(await attempt(new_flt, password=PASSWORD)) is not None


async def test_brute_force_can_be_disabled(clock):
    _, flt = build(make_config(integrations_policy={"brute_force": {**BF, "enabled": False}}))
    for i in range(20):
        assert (await attempt(flt, password=f"feil{i}")).problem.reason == "integration_auth_failed"
    assert await attempt(flt, password=PASSWORD) is ALLOW


async def test_lockout_metric_counts(clock):
    _, flt = build(make_config(integrations_policy={"brute_force": {**BF, "decay_seconds": 1000}}))
    before = REGISTRY.get_sample_value("portvakt_integration_lockouts_total", {"scope": "pair"}) or 0
    for i in range(5):
        clock.t += 10  # past each delay
        await attempt(flt, password=f"m{i}")
    after = REGISTRY.get_sample_value("portvakt_integration_lockouts_total", {"scope": "pair"})
    assert after == before + 1
