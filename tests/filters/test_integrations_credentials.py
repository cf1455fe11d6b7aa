"""filters/integrations/credentials.py: argon2 runs once per credential, off the event loop, shared
by concurrent attempts; unknown ids cost a sleep, not argon2; per-address share of the pool."""

from __future__ import annotations

import asyncio

import pytest
from argon2 import PasswordHasher, profiles

from filters.integrations import clock as integrations_clock
from gateway.chain import ALLOW, Deny
from gateway.metrics import REGISTRY
from tests.filters.helpers_identity import (
    INTEGRATION_ID,
    OTHER_ID,
    OWNER_ORG,
    PASSWORD,
    CountingHasher,
    creds,
    ctx,
    integration,
    make_config,
    maskinporten,
)
from tests.filters.helpers_integrations import Clock, attempt, build


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(integrations_clock, "now", c)
    return c


# --- argon2 economy --------------------------------------------------------------------------


async def test_argon2_runs_once_across_50_requests():
    stage, flt = build()
    for i in range(50):
        assert await flt.check(ctx(creds(), token=maskinporten(), request_id=f"r{i}")) is ALLOW
    assert stage.verifier.hasher.calls == 1


async def test_concurrent_first_requests_share_one_verification():
    stage, flt = build()
    results = await asyncio.gather(*(flt.check(ctx(creds(), token=maskinporten())) for _ in range(20)))
    assert all(r is ALLOW for r in results)
    assert stage.verifier.hasher.calls == 1


async def test_concurrent_wrong_passwords_share_one_verification_and_are_remembered():
    stage, flt = build()
    results = await asyncio.gather(
        *(flt.check(ctx(creds(password="feil"), token=maskinporten())) for _ in range(5))
    )
    assert all(isinstance(r, Deny) for r in results)
    for _ in range(3):
        await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.verifier.hasher.calls == 1


async def test_unknown_ids_run_no_argon2_and_are_padded_by_a_sleep(monkeypatch):
    """F06: an unknown id burns no argon2 (not even a dummy one); its 401 is padded by a sleep to
    the calibrated cost of the costliest configured hash, measured at load."""
    stage, flt = build()
    await stage.start()
    assert stage.verifier.failure_seconds > 0  # calibrated at load
    # A padding long enough that no attempt outlasts it, even on a loaded machine (the sleep is
    # recorded, not taken): each of the six failures must ask for one.
    stage.verifier.failure_seconds = 30.0
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(s, *a, **kw):
        slept.append(s)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    runs = REGISTRY.get_sample_value("portvakt_argon2_verifications_total", {"result": "dummy"}) or 0
    for i in range(6):
        d = await flt.check(ctx(creds(f"{i:08x}-0000-4000-8000-000000000000"), token=maskinporten()))
        assert isinstance(d, Deny) and d.problem.internal_reason == "integration_unknown"
        assert d.problem.status == 401
    assert stage.verifier.hasher.calls == 0
    assert (
        REGISTRY.get_sample_value("portvakt_argon2_verifications_total", {"result": "dummy"}) or 0
    ) == runs
    assert len(slept) == 6 and all(0 < s <= stage.verifier.failure_seconds for s in slept)
    await stage.close()


async def test_unknown_ids_never_take_an_argon2_slot(monkeypatch):
    """Known ids keep the verification capacity: unknown-id requests do not enter the argon2 pool
    or an address slot, so a known id's verification runs while dozens of them are padded."""
    stage, flt = build(make_config(integrations_policy={"max_concurrent_verifications": 1}))
    stage.verifier.failure_seconds = 30.0  # unknown ids would sleep for 30 s: they must not hold anything
    attackers = [
        asyncio.ensure_future(
            flt.check(
                ctx(creds(f"{i:08x}-0000-4000-8000-000000000000"), token=maskinporten(), ip="192.0.2.66")
            )
        )
        for i in range(8)
    ]
    await asyncio.sleep(0.05)
    assert stage.verifier._address_slots == {}
    assert await asyncio.wait_for(flt.check(ctx(creds(), token=maskinporten(), ip="192.0.2.66")), 60) is ALLOW
    assert stage.verifier.hasher.calls == 1
    for t in attackers:
        t.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)


async def test_one_address_has_at_most_its_share_of_verifications(monkeypatch):
    """Per-address cap: wrong passwords for known ids from one address run one at a time (default
    1), while another address's verification is not queued behind them."""
    one = integration()
    two = integration(OTHER_ID, "annet-passord", OWNER_ORG)
    stage, flt = build(make_config([one, two], integrations_policy={"failure_cache_seconds": 0}))
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    orig_slot = stage.verifier.address_slot

    import contextlib

    @contextlib.asynccontextmanager
    async def slot(ip):
        async with orig_slot(ip):
            k = str(ip)
            running[k] = running.get(k, 0) + 1
            peak[k] = max(peak.get(k, 0), running[k])
            await asyncio.sleep(0.01)  # let the others try to enter meanwhile
            try:
                yield
            finally:
                running[k] -= 1

    monkeypatch.setattr(stage.verifier, "address_slot", slot)
    attacker = [
        attempt(flt, iid=iid, password=f"gjett{i}", ip="192.0.2.66")
        for i, iid in enumerate([INTEGRATION_ID, OTHER_ID] * 2)
    ]
    legit = attempt(flt, iid=OTHER_ID, password="annet-passord", ip="198.51.100.9")
    results = await asyncio.gather(*attacker, legit)
    assert results[-1] is ALLOW
    assert all(isinstance(r, Deny) for r in results[:-1])
    assert peak["192.0.2.66"] == 1 and peak["198.51.100.9"] == 1
    assert stage.verifier._address_slots == {}  # bookkeeping is dropped when an address has nothing waiting


async def test_failure_memory_expires(clock):
    stage, flt = build(make_config(integrations_policy={"failure_cache_seconds": 5}))
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    clock.t += 1
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.verifier.hasher.calls == 1
    clock.t += 10
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.verifier.hasher.calls == 2


async def test_right_password_after_wrong_one_is_verified_and_cached():
    stage, flt = build()
    assert isinstance(await flt.check(ctx(creds(password="feil"), token=maskinporten())), Deny)
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert stage.verifier.hasher.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_verification():
    stage, flt = build()
    first = asyncio.ensure_future(flt.check(ctx(creds(), token=maskinporten())))
    await asyncio.sleep(0)
    first.cancel()
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert stage.verifier.hasher.calls == 1


async def test_reload_keeps_cache_for_unchanged_and_drops_it_for_changed_hashes():
    secrets: dict = {}
    one = integration()
    two = integration(OTHER_ID, "annet-passord", OWNER_ORG)
    old, old_flt = build(make_config([one, two]), secrets)
    for iid, pw in ((INTEGRATION_ID, PASSWORD), (OTHER_ID, "annet-passord")):
        assert await old_flt.check(ctx(creds(iid, pw), token=maskinporten())) is ALLOW
    assert old.verifier.hasher.calls == 2

    # Reload: the first integration's password hash changes (same password, new salt), the second stays.
    new_cfg = make_config([integration(), two])
    new, new_flt = build(new_cfg, secrets)
    new.adopt(old)
    assert await new_flt.check(ctx(creds(OTHER_ID, "annet-passord"), token=maskinporten())) is ALLOW
    assert new.verifier.hasher.calls == 0  # unchanged entry: remembered across the reload
    assert await new_flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert new.verifier.hasher.calls == 1  # changed hash: verified again


async def test_old_password_stops_working_after_hash_change():
    secrets: dict = {}
    old, old_flt = build(make_config([integration()]), secrets)
    assert await old_flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    new, new_flt = build(make_config([integration(password="nytt-passord")]), secrets)
    new.adopt(old)
    d = await new_flt.check(ctx(creds(), token=maskinporten()))
    assert isinstance(d, Deny) and d.problem.internal_reason == "integration_bad_password"
    assert await new_flt.check(ctx(creds(password="nytt-passord"), token=maskinporten())) is ALLOW


async def test_default_cost_hash_verifies_once():
    """One test at argon2-cffi's RFC 9106 low-memory defaults (m=64 MiB, t=3, p=4)."""
    default_hash = PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY).hash(PASSWORD)
    assert default_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    stage, flt = build(make_config([integration(password_hash=default_hash)]))
    for _ in range(3):
        assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert stage.verifier.hasher.calls == 1
    assert stage.verifier._dummy_params == (3, 65536, 4)  # unknown ids cost what this integration costs


async def test_verification_runs_off_the_event_loop(monkeypatch):
    stage, flt = build()
    loop_thread = []

    class Recording(CountingHasher):
        def verify(self, hash, password):
            import threading

            loop_thread.append(threading.current_thread().name)
            return super().verify(hash, password)

    stage.verifier.hasher = Recording()
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert loop_thread and loop_thread[0].startswith("argon2")


async def test_non_ascii_password_verifies():
    stage, flt = build(make_config([integration(password="blåbær-syltetøy")]))
    assert await flt.check(ctx(creds(password="blåbær-syltetøy"), token=maskinporten())) is ALLOW
    assert stage.verifier.hasher.calls == 1
