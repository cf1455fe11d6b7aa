"""filters/issuers: key stores (unknown kid, rotation, outages, a key withdrawn), the verified
tokens (cache hits, expiry, the lifetime bound, the LRU bound).

Unit tests on hand-built contexts, against a real local JWKS issuer (tests/fixtures/issuer.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from filters.issuers import claims as token_claims
from filters.jwks import VERIFIERS
from gateway.chain import ALLOW, SKIP, Deny
from tests.filters.helpers_issuers import (
    denied,
    make_stage,
    run,
)
from tests.fixtures.issuer import new_rsa_key


@pytest.fixture
async def stage(issuer):
    s = await make_stage(issuer.issuers_config())
    yield s
    await s.close()


# -- keys: unknown kid, rotation, outages ----------------------------------------------------


async def test_unknown_kid_refetches_once_then_throttles(issuer):
    s = await make_stage({"m": issuer.config(jwks_refetch_min_seconds=30)})
    try:
        before = issuer.fetch_count
        stranger = new_rsa_key()
        for _ in range(3):
            d, ctx = await run(s, issuer.mint(key=stranger, kid="no-such-kid"))
            denied(d, ctx, "token_unknown_kid")
        assert issuer.fetch_count == before + 1
    finally:
        await s.close()


async def test_concurrent_unknown_kids_share_one_fetch(issuer):
    s = await make_stage({"m": issuer.config(jwks_refetch_min_seconds=30)})
    try:
        before = issuer.fetch_count
        issuer.rotate()
        results = await asyncio.gather(*(run(s, issuer.mint()) for _ in range(20)))
        assert all(d is ALLOW for d, _ in results)
        assert issuer.fetch_count == before + 1
    finally:
        await s.close()


async def test_rotation_accepted_after_one_refetch(stage, issuer):
    assert (await run(stage, issuer.mint()))[0] is ALLOW
    before = issuer.fetch_count
    issuer.rotate()
    d, ctx = await run(stage, issuer.mint())
    assert d is ALLOW and ctx.audit["tokens"]["kid"] == issuer.kid
    assert issuer.fetch_count == before + 1


async def test_unreachable_issuer_keeps_cached_keys(stage, issuer):
    await issuer.unreachable()
    d, _ = await run(stage, issuer.mint())
    assert d is ALLOW
    await asyncio.sleep(0.25)  # past the refetch throttle
    d, ctx = await run(stage, issuer.mint(key=new_rsa_key(), kid="unknown"))
    denied(d, ctx, "token_unknown_kid")
    assert stage.readiness()["jwks.maskinporten"].startswith("fallback: ")
    d, _ = await run(stage, issuer.mint())
    assert d is ALLOW


async def test_issuer_answering_500_keeps_cached_keys(stage, issuer):
    await issuer.unreachable(status=500)
    await asyncio.sleep(0.25)
    d, _ = await run(stage, issuer.mint(key=new_rsa_key(), kid="unknown"))
    assert d.problem.internal_reason == "token_unknown_kid"
    assert "HTTP 500" in stage.readiness()["jwks.maskinporten"]
    assert (await run(stage, issuer.mint()))[0] is ALLOW


async def test_never_reachable_issuer_is_503_until_keys_arrive(issuer):
    await issuer.unreachable()
    s = await make_stage(issuer.issuers_config())
    try:
        assert s.readiness()["jwks.maskinporten"].startswith("down: ")
        assert s.readiness()["jwks.idporten"] == "ok"
        d, ctx = await run(s, issuer.mint())
        assert type(d) is Deny
        p = d.problem
        assert (p.reason, p.status) == ("issuer_keys_unavailable", 503)
        assert p.headers["Retry-After"] == "1"
        assert ctx.token is None
        await issuer.reachable()
        for _ in range(100):  # the background retry (backoff capped at 0.5 s) gets the keys
            if s.readiness()["jwks.maskinporten"] == "ok":
                break
            await asyncio.sleep(0.05)
        assert s.readiness()["jwks.maskinporten"] == "ok"
        assert (await run(s, issuer.mint()))[0] is ALLOW
    finally:
        await s.close()


async def test_key_removed_from_jwks_stops_cached_tokens(stage, issuer):
    token = issuer.mint()
    assert (await run(stage, token))[0] is ALLOW
    old = issuer.kid
    issuer.rotate()
    issuer.remove_key(old)
    assert (await run(stage, issuer.mint()))[0] is ALLOW  # new kid: refetch drops the old key
    d, ctx = await run(stage, token)
    denied(d, ctx, "token_unknown_kid")


# -- cache -----------------------------------------------------------------------------------


async def test_verified_token_is_cached(stage, issuer, monkeypatch):
    token = issuer.mint()
    d, ctx = await run(stage, token)
    assert d is ALLOW and ctx.audit["tokens"]["cached"] is False
    calls = []
    real = VERIFIERS["RS256"]

    class Spy:
        def verify(self, *a):
            calls.append(1)
            return real.verify(*a)

    monkeypatch.setitem(VERIFIERS, "RS256", Spy())
    for _ in range(5):
        d, ctx2 = await run(stage, token)
        assert d is ALLOW and ctx2.audit["tokens"]["cached"] is True
        assert ctx2.token == ctx.token
    assert calls == []


async def test_cached_token_expires(stage, issuer, monkeypatch):
    token = issuer.mint(ttl=60)
    assert (await run(stage, token))[0] is ALLOW
    later = time.time() + 60 + 5 + 1  # past exp + leeway
    monkeypatch.setattr(token_claims, "wall_clock", lambda: later)
    d, ctx = await run(stage, token)
    denied(d, ctx, "token_expired")
    assert len(stage.verified) == 0


# -- I1: token lifetime bound ------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [  # functions of now: computed when the test runs, not at collection (a slow suite would age them)
        lambda now: {"exp": now + 10**10},  # the red team's absurd lifetime
        lambda now: {"exp": 1e308},
        lambda now: {"exp": now + 3600 + 5 + 30, "iat": None},  # no iat: exp - now beyond bound + leeway
        lambda now: {"iat": now - 3500, "exp": now + 200},  # backdated iat: exp - iat 3700
    ],
    ids=["1e10s", "1e308", "no-iat", "backdated-iat"],
)
async def test_tokens_living_longer_than_the_bound_are_refused(stage, issuer, claims):
    d, ctx = await run(stage, issuer.mint(claims=claims(int(time.time()))))
    denied(d, ctx, "token_lifetime_too_long")
    assert len(stage.verified) == 0


async def test_the_default_bound_is_3600_seconds(stage, issuer):
    d, ctx = await run(stage, issuer.mint(ttl=3601))
    denied(d, ctx, "token_lifetime_too_long")
    assert (await run(stage, issuer.mint(ttl=3600)))[0] is ALLOW


async def test_lifetime_bound_is_configurable_and_can_be_lifted(issuer):
    s = await make_stage({"m": issuer.config(max_token_lifetime_seconds=120)})
    try:
        d, ctx = await run(s, issuer.mint(ttl=121))
        denied(d, ctx, "token_lifetime_too_long")
        assert (await run(s, issuer.mint(ttl=120)))[0] is ALLOW
    finally:
        await s.close()
    s = await make_stage({"m": issuer.config(max_token_lifetime_seconds=None)})
    try:
        assert (await run(s, issuer.mint(ttl=10**9)))[0] is ALLOW
    finally:
        await s.close()


async def test_a_token_is_not_cached_beyond_the_bound(issuer, monkeypatch):
    """Cached until min(exp + leeway, verification + max_token_lifetime_seconds): after the bound
    the token is verified again (and still passes here: its exp is within the leeway)."""
    s = await make_stage({"m": issuer.config(max_token_lifetime_seconds=120)})
    try:
        t0 = time.time()
        token = issuer.mint(claims={"iat": None, "exp": int(t0) + 124})  # exp - now <= 120 + leeway 5
        monkeypatch.setattr(token_claims, "wall_clock", lambda: t0)
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is False
        monkeypatch.setattr(token_claims, "wall_clock", lambda: t0 + 119)
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is True
        monkeypatch.setattr(
            token_claims, "wall_clock", lambda: t0 + 121
        )  # past the bound, before exp + leeway
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is False
    finally:
        await s.close()


async def test_cache_is_bounded(stage, issuer):
    stage.verified.max_entries = 3
    for i in range(6):
        assert (await run(stage, issuer.mint(claims={"n": i})))[0] is ALLOW
    assert len(stage.verified) == 3


async def test_token_without_kid_uses_the_only_key(issuer):
    s = await make_stage({"m": issuer.config(jwks_refetch_min_seconds=0)})
    try:
        token = issuer.mint(headers={"kid": None})
        assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
        assert (await run(s, token))[0] is ALLOW
        issuer.rotate()
        await s.issuers["m"].store.refresh(force=True)  # now two keys: a kid-less token is ambiguous
        d, ctx = await run(s, issuer.mint(headers={"kid": None}))
        denied(d, ctx, "token_unknown_kid")
    finally:
        await s.close()


async def test_detect_issuer_without_keys_records_instead_of_503(issuer):
    await issuer.idporten.unreachable()
    s = await make_stage({"m": issuer.config(), "i": issuer.idporten.config(mode="detect")})
    try:
        d, ctx = await run(s, issuer.idporten.mint())
        assert d is SKIP and [x.reason for x in ctx.detections] == ["issuer_keys_unavailable"]
    finally:
        await s.close()
