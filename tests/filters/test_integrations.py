"""filters/integrations.py on hand-built contexts: credentials, org binding, argon2 economy,
identical failures, brute-force lockouts, hash-password."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import types

import pytest
from argon2 import PasswordHasher, profiles

from filters import integrations as mod
from gateway.chain import ALLOW, SKIP, Deny, Mode, run_chain
from gateway.config import ConfigError
from gateway.metrics import REGISTRY
from tests.filters.helpers_identity import (
    FAST,
    GRANTING_ORG,
    INTEGRATION_ID,
    OTHER_ID,
    OTHER_ORG,
    OWNER_ORG,
    PASSWORD,
    UNKNOWN_ID,
    CountingHasher,
    certificate,
    creds,
    ctx,
    env,
    integration,
    make_config,
    maskinporten,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(mod, "_now", c)
    return c


def build(config=None, secrets=None):
    stage = mod.build_stage(env(config or make_config(), secrets))
    stage.hasher = CountingHasher()
    (flt,) = stage.filters_for_route(stage_route(config or make_config()))
    return stage, flt


def stage_route(config):
    return config.routes[0]


def body_without_id(deny: Deny) -> dict:
    doc = json.loads(deny.problem.body("x"))
    doc.pop("request_id")
    return doc


# --- the happy path and header handling ------------------------------------------------------


async def test_no_headers_skips():
    _, flt = build()
    c = ctx({}, token=maskinporten())
    assert await flt.check(c) is SKIP
    assert c.integration is None and c.integration_id_claimed is None


async def test_right_credentials_allow_and_bind_identity():
    _, flt = build()
    c = ctx(creds(INTEGRATION_ID.upper()), token=maskinporten())
    assert await flt.check(c) is ALLOW
    assert c.integration is not None
    assert (c.integration.id, c.integration.authorized_org) == (INTEGRATION_ID, OWNER_ORG)
    assert c.integration_id_claimed == INTEGRATION_ID
    assert c.audit["integrations"] == {"id": INTEGRATION_ID, "result": "ok", "authorized_org": OWNER_ORG}


@pytest.mark.parametrize(
    "id_name,pw_name", [("integrasjonId", "integrasjonPassord"), ("INTEGRASJONID", "integrasjonpassord")]
)
async def test_header_names_are_case_insensitive(id_name, pw_name):
    _, flt = build()
    c = ctx({id_name: INTEGRATION_ID, pw_name: PASSWORD}, token=maskinporten())
    assert await flt.check(c) is ALLOW


async def test_matching_certificate_is_accepted():
    _, flt = build()
    assert await flt.check(ctx(creds(), token=maskinporten(), cert=certificate(OWNER_ORG))) is ALLOW


@pytest.mark.parametrize(
    "headers,internal,claimed",
    [
        ({"IntegrasjonId": INTEGRATION_ID}, "integration_credentials_incomplete", INTEGRATION_ID),
        ({"IntegrasjonPassord": PASSWORD}, "integration_credentials_incomplete", None),
        (
            [
                ("IntegrasjonId", INTEGRATION_ID),
                ("IntegrasjonId", OTHER_ID),
                ("IntegrasjonPassord", PASSWORD),
            ],
            "integration_credentials_incomplete",
            None,
        ),
        ({"IntegrasjonId": "not-a-uuid", "IntegrasjonPassord": PASSWORD}, "integration_id_malformed", None),
        (
            {"IntegrasjonId": "{" + INTEGRATION_ID + "}", "IntegrasjonPassord": PASSWORD},
            "integration_id_malformed",
            None,
        ),
    ],
)
async def test_incomplete_or_malformed_credentials_are_401(headers, internal, claimed):
    stage, flt = build()
    c = ctx(headers, token=maskinporten())
    d = await flt.check(c)
    assert isinstance(d, Deny) and d.problem.status == 401
    assert d.problem.reason == "integration_auth_failed" and d.problem.internal_reason == internal
    assert d.problem.headers["WWW-Authenticate"].startswith("IntegrasjonPassord")
    assert c.integration_id_claimed == claimed
    assert stage.hasher.calls == 0  # nothing to verify: no argon2


# --- argon2 economy --------------------------------------------------------------------------


async def test_argon2_runs_once_across_50_requests():
    stage, flt = build()
    for i in range(50):
        assert await flt.check(ctx(creds(), token=maskinporten(), request_id=f"r{i}")) is ALLOW
    assert stage.hasher.calls == 1


async def test_concurrent_first_requests_share_one_verification():
    stage, flt = build()
    results = await asyncio.gather(*(flt.check(ctx(creds(), token=maskinporten())) for _ in range(20)))
    assert all(r is ALLOW for r in results)
    assert stage.hasher.calls == 1


async def test_concurrent_wrong_passwords_share_one_verification_and_are_remembered():
    stage, flt = build()
    results = await asyncio.gather(
        *(flt.check(ctx(creds(password="feil"), token=maskinporten())) for _ in range(5))
    )
    assert all(isinstance(r, Deny) for r in results)
    for _ in range(3):
        await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.hasher.calls == 1


async def test_unknown_ids_run_no_argon2_and_are_padded_by_a_sleep(monkeypatch):
    """F06: an unknown id burns no argon2 (not even a dummy one); its 401 is padded by a sleep to
    the calibrated cost of the costliest configured hash, measured at load."""
    stage, flt = build()
    await stage.start()
    assert stage.failure_seconds > 0  # calibrated at load
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(s, *a, **kw):
        slept.append(s)
        await real_sleep(0)

    monkeypatch.setattr(mod.asyncio, "sleep", recording_sleep)
    runs = REGISTRY.get_sample_value("portvakt_argon2_verifications_total", {"result": "dummy"}) or 0
    for i in range(6):
        d = await flt.check(ctx(creds(f"{i:08x}-0000-4000-8000-000000000000"), token=maskinporten()))
        assert isinstance(d, Deny) and d.problem.internal_reason == "integration_unknown"
        assert d.problem.status == 401
    assert stage.hasher.calls == 0
    assert (
        REGISTRY.get_sample_value("portvakt_argon2_verifications_total", {"result": "dummy"}) or 0
    ) == runs
    assert len(slept) == 6 and all(0 < s <= stage.failure_seconds for s in slept)
    await stage.close()


async def test_unknown_ids_never_take_an_argon2_slot(monkeypatch):
    """Known ids keep the verification capacity: unknown-id requests do not enter the argon2 pool
    or an address slot, so a known id's verification runs while dozens of them are padded."""
    stage, flt = build(make_config(integrations_policy={"max_concurrent_verifications": 1}))
    stage.failure_seconds = 30.0  # unknown ids would sleep for 30 s: they must not hold anything
    attackers = [
        asyncio.ensure_future(
            flt.check(
                ctx(creds(f"{i:08x}-0000-4000-8000-000000000000"), token=maskinporten(), ip="192.0.2.66")
            )
        )
        for i in range(8)
    ]
    await asyncio.sleep(0.05)
    assert stage._address_slots == {}
    assert await asyncio.wait_for(flt.check(ctx(creds(), token=maskinporten(), ip="192.0.2.66")), 60) is ALLOW
    assert stage.hasher.calls == 1
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
    orig_slot = stage.address_slot

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

    monkeypatch.setattr(stage, "address_slot", slot)
    attacker = [
        attempt(flt, iid=iid, password=f"gjett{i}", ip="192.0.2.66")
        for i, iid in enumerate([INTEGRATION_ID, OTHER_ID] * 2)
    ]
    legit = attempt(flt, iid=OTHER_ID, password="annet-passord", ip="198.51.100.9")
    results = await asyncio.gather(*attacker, legit)
    assert results[-1] is ALLOW
    assert all(isinstance(r, Deny) for r in results[:-1])
    assert peak["192.0.2.66"] == 1 and peak["198.51.100.9"] == 1
    assert stage._address_slots == {}  # bookkeeping is dropped when an address has nothing waiting


async def test_failure_memory_expires(clock):
    stage, flt = build(make_config(integrations_policy={"failure_cache_seconds": 5}))
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    clock.t += 1
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.hasher.calls == 1
    clock.t += 10
    await flt.check(ctx(creds(password="feil"), token=maskinporten()))
    assert stage.hasher.calls == 2


async def test_right_password_after_wrong_one_is_verified_and_cached():
    stage, flt = build()
    assert isinstance(await flt.check(ctx(creds(password="feil"), token=maskinporten())), Deny)
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert stage.hasher.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_verification():
    stage, flt = build()
    first = asyncio.ensure_future(flt.check(ctx(creds(), token=maskinporten())))
    await asyncio.sleep(0)
    first.cancel()
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert stage.hasher.calls == 1


async def test_reload_keeps_cache_for_unchanged_and_drops_it_for_changed_hashes():
    secrets: dict = {}
    one = integration()
    two = integration(OTHER_ID, "annet-passord", OWNER_ORG)
    old, old_flt = build(make_config([one, two]), secrets)
    for iid, pw in ((INTEGRATION_ID, PASSWORD), (OTHER_ID, "annet-passord")):
        assert await old_flt.check(ctx(creds(iid, pw), token=maskinporten())) is ALLOW
    assert old.hasher.calls == 2

    # Reload: the first integration's password hash changes (same password, new salt), the second stays.
    new_cfg = make_config([integration(), two])
    new, new_flt = build(new_cfg, secrets)
    new.adopt(old)
    assert await new_flt.check(ctx(creds(OTHER_ID, "annet-passord"), token=maskinporten())) is ALLOW
    assert new.hasher.calls == 0  # unchanged entry: remembered across the reload
    assert await new_flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert new.hasher.calls == 1  # changed hash: verified again


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
    assert stage.hasher.calls == 1
    assert stage._dummy_params == (3, 65536, 4)  # unknown ids cost what this integration costs


async def test_verification_runs_off_the_event_loop(monkeypatch):
    stage, flt = build()
    loop_thread = []

    class Recording(CountingHasher):
        def verify(self, hash, password):
            import threading

            loop_thread.append(threading.current_thread().name)
            return super().verify(hash, password)

    stage.hasher = Recording()
    assert await flt.check(ctx(creds(), token=maskinporten())) is ALLOW
    assert loop_thread and loop_thread[0].startswith("argon2")


# --- identical failures ----------------------------------------------------------------------


FAILURES = [
    ("unknown id", dict(headers=creds(UNKNOWN_ID)), "integration_unknown"),
    ("wrong password", dict(headers=creds(password="feil")), "integration_bad_password"),
    ("empty password", dict(headers=creds(password="")), "integration_bad_password"),
    ("undecodable password", dict(headers=creds(password="\udcff\udcfe")), "integration_bad_password"),
    ("overlong password", dict(headers=creds(password="x" * 1025)), "integration_bad_password"),
    ("org mismatch", dict(headers=creds(), token=maskinporten(OTHER_ORG)), "integration_org_mismatch"),
    ("cert mismatch", dict(headers=creds(), cert=certificate(OTHER_ORG)), "integration_cert_mismatch"),
    ("cert without org", dict(headers=creds(), cert=certificate(None)), "integration_cert_mismatch"),
    ("no token", dict(headers=creds(), token=None), "integration_token_missing"),
]


@pytest.mark.parametrize("name,kw,internal", FAILURES, ids=[f[0] for f in FAILURES])
async def test_every_failure_is_the_same_generic_401(name, kw, internal):
    _, flt = build()
    kw = dict(kw)
    token = kw.pop("token", maskinporten())
    c = ctx(kw.pop("headers"), token=token, **kw)
    d = await flt.check(c)
    assert isinstance(d, Deny)
    assert d.problem.internal_reason == internal
    assert c.audit["integrations"]["reason"] == internal and c.audit["integrations"]["result"] == "denied"
    assert c.integration is None
    reference = await build()[1].check(ctx(creds(UNKNOWN_ID), token=maskinporten()))
    assert body_without_id(d) == body_without_id(reference)
    assert d.problem.headers == reference.problem.headers
    assert d.problem.status == 401 and body_without_id(d)["reason"] == "integration_auth_failed"


async def test_required_certificate_missing_is_the_same_401():
    _, flt = build(make_config([integration(require_certificate=True)]))
    d = await flt.check(ctx(creds(), token=maskinporten()))
    assert isinstance(d, Deny) and d.problem.internal_reason == "integration_cert_required"
    assert await flt.check(ctx(creds(), token=maskinporten(), cert=certificate(OWNER_ORG))) is ALLOW


async def test_password_never_reaches_audit_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    _, flt = build()
    for pw in (PASSWORD, "hemmelig-feil"):
        c = ctx(creds(password=pw), token=maskinporten())
        d = await flt.check(c)
        assert pw not in repr(c.audit)
        assert (d is ALLOW) == (pw == PASSWORD)
        if isinstance(d, Deny):
            assert pw.encode() not in d.problem.body("x") and pw not in repr(d.problem)
    assert "hemmelig-feil" not in caplog.text and PASSWORD not in caplog.text


async def test_detect_mode_records_and_lets_on():
    stage, flt = build(make_config(integrations_policy={"mode": "detect"}))
    assert flt.mode is Mode.detect
    c = ctx(creds(password="feil"), token=maskinporten())
    assert await run_chain((flt,), c) is None
    assert [(d.filter, d.reason) for d in c.detections] == [("integrations", "integration_bad_password")]
    assert c.integration is None


async def test_off_mode_and_public_routes_build_no_filter():
    cfg = make_config(integrations_policy={"mode": "off"})
    assert mod.build_stage(env(cfg)).filters_for_route(cfg.routes[0]) == []
    cfg = make_config(routes=[{"name": "open", "upstream": "u"}])
    assert mod.build_stage(env(cfg)).filters_for_route(cfg.routes[0]) == []


# --- brute force -----------------------------------------------------------------------------

BF = {
    "free_failures": 2,
    "max_failures": 5,
    "ip_max_failures": 8,
    "id_max_failures": 12,
    "lockout_seconds": 60,
    "decay_seconds": 10,
}


async def attempt(flt, iid=INTEGRATION_ID, password="feil", ip="192.0.2.10"):
    return await flt.check(ctx(creds(iid, password), token=maskinporten(), ip=ip))


def retry_after(d) -> int | None:
    if isinstance(d, Deny) and d.problem.reason == "too_many_failed_attempts":
        assert d.problem.status == 429
        return int(d.problem.headers["Retry-After"])
    return None


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
    calls = stage.hasher.calls
    clock.t += 30
    assert retry_after(await attempt(flt, password=PASSWORD)) == 30
    assert stage.hasher.calls == calls  # refused attempts never reach argon2
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
    assert stage.hasher.calls == 1  # the unknown ids ran no argon2


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


# --- config and CLI --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry,message",
    [
        (dict(id="nope"), "must be a UUID"),
        (dict(password_hash="plaintext"), "not an argon2 hash"),
        (
            dict(
                password_hash=PasswordHasher(
                    type=__import__("argon2").Type.I, time_cost=1, memory_cost=8, parallelism=1
                ).hash("x")
            ),
            "must be an argon2id hash",
        ),
        (dict(org="12345"), "9-digit"),
        (dict(grants=[{"organization": "958935420", "services": []}]), "at least one"),
    ],
)
def test_config_rejects_bad_entries(entry, message):
    kw = dict(entry)
    iid = kw.pop("id", INTEGRATION_ID)
    org = kw.pop("org", OWNER_ORG)
    with pytest.raises(ConfigError) as e:
        make_config([integration(iid, org=org, **kw)])
    assert message in str(e.value)


def test_config_normalises_id_and_rejects_duplicates():
    cfg = make_config([integration(INTEGRATION_ID.upper())])
    assert cfg.integrations[0].id == INTEGRATION_ID
    with pytest.raises(ConfigError, match="duplicate integration id"):
        make_config([integration(), integration(INTEGRATION_ID.upper())])


def _args(**kw):
    return types.SimpleNamespace(**{"time_cost": 1, "memory_cost": 8, "parallelism": 1, **kw})


@pytest.mark.parametrize("stdin_text", ["demo-passord\n", "demo-passord\r\n", "demo-passord"])
def test_hash_password_from_stdin(monkeypatch, capsys, stdin_text):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    assert mod.cmd_hash_password(_args()) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert PasswordHasher().verify(out, "demo-passord")


def test_hash_password_refuses_empty(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert mod.cmd_hash_password(_args()) == 2
    assert capsys.readouterr().out == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_hash_password_prompts_twice(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Tty())
    answers = iter(["a", "b"])
    monkeypatch.setattr(mod.getpass, "getpass", lambda prompt: next(answers))
    assert mod.cmd_hash_password(_args()) == 2
    assert "differ" in capsys.readouterr().err
    answers2 = iter(["same", "same"])
    monkeypatch.setattr(mod.getpass, "getpass", lambda prompt: next(answers2))
    assert mod.cmd_hash_password(_args()) == 0
    assert PasswordHasher().verify(capsys.readouterr().out.strip(), "same")


def test_hash_password_subcommand_defaults_are_rfc9106_low_memory():
    import argparse

    parser = argparse.ArgumentParser()
    mod.register_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["hash-password"])
    d = profiles.RFC_9106_LOW_MEMORY
    assert (args.time_cost, args.memory_cost, args.parallelism) == (d.time_cost, d.memory_cost, d.parallelism)
    assert args.func is mod.cmd_hash_password


def test_grant_fixture_orgs_are_valid():
    from gateway.norid import is_org_number

    assert all(is_org_number(o) for o in (OWNER_ORG, GRANTING_ORG, OTHER_ORG))
    assert FAST.verify(FAST.hash("x"), "x")


async def test_non_ascii_password_verifies():
    stage, flt = build(make_config([integration(password="blåbær-syltetøy")]))
    assert await flt.check(ctx(creds(password="blåbær-syltetøy"), token=maskinporten())) is ALLOW
    assert stage.hasher.calls == 1


def test_portvakt_hash_password_command_line():
    """The real CLI wiring: `python -m gateway hash-password` with the password on stdin."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "hash-password",
            "--time-cost",
            "1",
            "--memory-cost",
            "8",
            "--parallelism",
            "1",
        ],
        input="demo-passord\n",
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    hashed = out.stdout.strip()
    assert hashed.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert PasswordHasher().verify(hashed, "demo-passord")
    assert "demo-passord" not in out.stdout + out.stderr
