"""Unit tests of filters/issuers.py on hand-built contexts, against a real local JWKS issuer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from ipaddress import ip_address
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from filters import issuers as tokens
from filters.issuers import IssuerConfig, TokensStage, acr_rank, build_stage
from gateway.chain import ALLOW, SKIP, BuildEnv, Deny, Mode
from gateway.config import Config
from gateway.context import RequestContext
from gateway.dev.issuer import mint_token
from gateway.resources import Registry
from tests.fixtures.issuer import TEST_PID, new_rsa_key


def make_ctx(*auth: str, headers: dict[str, str] | None = None) -> RequestContext:
    h: CIMultiDict[str] = CIMultiDict()
    for a in auth:
        h.add("Authorization", a)
    for k, v in (headers or {}).items():
        h.add(k, v)
    ip = ip_address("127.0.0.1")
    return RequestContext(
        request_id="req-1",
        method="GET",
        raw_path="/api/x",
        path="/api/x",
        query_string="",
        host="localhost",
        scheme="https",
        peer_ip=ip,
        client_ip=ip,
        headers=CIMultiDictProxy(h),
        request=None,
        runtime=None,  # type: ignore[arg-type]
    )


def config(issuers: dict[str, Any], tmp_dir: str | None = None) -> Config:
    return Config.model_validate(
        {
            "server": {"plain_http": True},
            "upstreams": {"up": {"url": "http://127.0.0.1:9"}},
            "routes": [
                {"name": "api", "upstream": "up", "access": {"any_of": [{"integration": True}]}},
                {"name": "open", "upstream": "up", "match": {"path_prefix": "/open"}},
            ],
            "issuers": issuers,
        }
    )


async def make_stage(
    issuers: dict[str, Any], start: bool = True, registry: Registry | None = None
) -> TokensStage:
    """A tokens stage; with ``registry``, built as a reload would (sharing its key stores)."""
    env = BuildEnv(config=config(issuers), base_dir=".", secrets={})
    if registry is not None:
        env.resources = registry.scope()
    stage = build_stage(env)
    assert stage is not None
    if start:
        await stage.start()
    return stage


@pytest.fixture
async def stage(issuer):
    s = await make_stage(issuer.issuers_config())
    yield s
    await s.close()


async def run(stage: TokensStage, token: str | None, *, raw: str | None = None) -> tuple[Any, RequestContext]:
    ctx = make_ctx(raw if raw is not None else f"Bearer {token}")
    f = stage.filters_for_route(stage_route())[0]
    return await f.check(ctx), ctx


def stage_route():
    return config({}).routes[0]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def payload_of(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def denied(decision: Any, ctx: RequestContext, internal: str) -> None:
    assert type(decision) is Deny, decision
    p = decision.problem
    assert (p.reason, p.status, p.internal_reason) == ("invalid_token", 401, internal)
    assert p.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert p.detail == "The bearer token is not valid."
    assert ctx.token is None


# -- valid tokens ----------------------------------------------------------------------------


async def test_maskinporten_token_lands_on_context(stage, issuer):
    token = issuer.mint(
        org="958935420",
        scope="ks:fiks ks:fiks/innsyn",
        claims={"supplier": {"authority": "iso6523-actorid-upis", "ID": "0192:974760673"}},
    )
    d, ctx = await run(stage, token)
    assert d is ALLOW
    t = ctx.token
    assert (t.kind, t.issuer, t.iss) == ("maskinporten", "maskinporten", issuer.iss)
    assert (t.consumer, t.consumer_org, t.supplier_org) == ("0192:958935420", "958935420", "974760673")
    assert t.scopes == frozenset({"ks:fiks", "ks:fiks/innsyn"})
    assert t.client_amr == "virksomhetssertifikat" and t.client_id and t.jti
    assert t.pid is None and t.exp == payload_of(token)["exp"]
    assert ctx.organization == "958935420"
    assert ctx.audit["tokens"] == {
        "issuer": "maskinporten",
        "kind": "maskinporten",
        "kid": issuer.kid,
        "consumer_org": "958935420",
        "cached": False,
    }


async def test_idporten_token_lands_on_context(stage, idporten_issuer):
    token = idporten_issuer.mint(acr="idporten-loa-substantial")
    d, ctx = await run(stage, token)
    assert d is ALLOW
    t = ctx.token
    assert (t.kind, t.issuer, t.pid, t.acr, t.amr) == (
        "idporten",
        "idporten",
        TEST_PID,
        "idporten-loa-substantial",
        ("TestID",),
    )
    assert t.consumer is None and t.consumer_org is None and t.scopes == frozenset({"openid"})
    assert "pid" not in json.dumps(ctx.audit)


async def test_other_consumer_authority_is_kept_without_org(stage, issuer):
    token = issuer.mint(
        claims={"consumer": {"authority": "iso6523-actorid-upis", "ID": "0088:7080000000000"}}
    )
    d, ctx = await run(stage, token)
    assert d is ALLOW and ctx.token.consumer == "0088:7080000000000" and ctx.token.consumer_org is None


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_scheme_is_case_insensitive(stage, issuer, scheme):
    d, ctx = await run(stage, None, raw=f"{scheme} {issuer.mint()}")
    assert d is ALLOW


@pytest.mark.parametrize("alg", ["RS384", "RS512"])
async def test_configured_rsa_algorithms(issuer, alg):
    s = await make_stage({"m": issuer.config()})
    try:  # the JWK says alg RS256: other algorithms are refused for that key
        d, ctx = await run(s, issuer.mint(alg=alg))
        denied(d, ctx, "token_alg_not_allowed")
    finally:
        await s.close()
    issuer.publish_alg = False
    s = await make_stage({"m": issuer.config()})
    try:
        d, _ = await run(s, issuer.mint(alg=alg))
        assert d is ALLOW
    finally:
        await s.close()


async def test_leeway_is_honoured(stage, issuer):
    d, _ = await run(stage, issuer.mint(ttl=-3))  # leeway 5 s in the fixture config
    assert d is ALLOW
    d, _ = await run(stage, issuer.mint(claims={"nbf": int(time.time()) + 3}))
    assert d is ALLOW


# -- not our credential / malformed ----------------------------------------------------------


async def test_no_authorization_header_skips(stage):
    f = stage.filters_for_route(stage_route())[0]
    assert await f.check(make_ctx()) is SKIP
    assert await f.check(make_ctx("Basic dXNlcjpwYXNz")) is SKIP


async def test_every_route_gets_the_filter_public_ones_too(stage):
    # A token presented on a public route is verified, never passed on unchecked.
    routes = config({}).routes
    assert [f.name for f in stage.filters_for_route(routes[0])] == ["tokens"]
    assert [f.name for f in stage.filters_for_route(routes[1])] == ["tokens"]


@pytest.mark.parametrize(
    "raw",
    [
        "Bearer",
        "Bearer ",
        "Bearer a.b",
        "Bearer a.b.c.d",
        "Bearer  {t}",
        "Bearer {t} ",
        "Bearer\t{t}",
        "Bearer {t}=",
        "Bearer e30.e30+.x",
        "Bearer !!!.e30.abc",
        "Bearer bm90IGpzb24.e30.abc",  # header not JSON
        "Bearer W10.e30.abc",  # header a JSON array
        "Bearer " + "a" * 20000 + ".b.c",
    ],
)
async def test_malformed_bearer_is_401(stage, issuer, raw):
    d, ctx = await run(stage, None, raw=raw.replace("{t}", issuer.mint()))
    denied(d, ctx, "token_malformed")


async def test_two_authorization_headers_are_malformed(stage, issuer):
    t = issuer.mint()
    ctx = make_ctx(f"Bearer {t}", f"Bearer {t}")
    d = await stage.filters_for_route(stage_route())[0].check(ctx)
    denied(d, ctx, "token_malformed")


async def test_duplicate_json_members_are_malformed(stage, issuer):
    key = issuer.signing_key
    head = b64(f'{{"alg":"RS256","kid":"{issuer.kid}","alg":"RS256"}}'.encode())
    body = b64(json.dumps({"iss": issuer.iss}).encode())
    d, ctx = await run(stage, f"{head}.{body}.abc")
    denied(d, ctx, "token_malformed")
    assert key is not None


# -- the attack table ------------------------------------------------------------------------


def hs256_with_public_key(issuer) -> str:
    pem = issuer.public_pem()
    claims = payload_of(issuer.mint())
    return forge(
        {"alg": "HS256", "typ": "JWT", "kid": issuer.kid},
        claims,
        lambda m: hmac.new(pem, m, hashlib.sha256).digest(),
    )


async def test_attacks_are_denied_with_precise_internal_reasons(stage, issuer, issuer_factory):
    attacker_key = new_rsa_key()
    attacker = await issuer_factory("maskinporten", name="attacker")
    base = payload_of(issuer.mint())
    none_token = (
        f"{b64(json.dumps({'alg': 'none', 'kid': issuer.kid}).encode())}.{b64(json.dumps(base).encode())}."
    )
    good = issuer.mint()
    cases = {
        "alg none": (none_token, "token_alg_not_allowed"),
        "alg None": (
            none_token.replace(
                b64(json.dumps({"alg": "none", "kid": issuer.kid}).encode()),
                b64(json.dumps({"alg": "None", "kid": issuer.kid}).encode()),
            ),
            "token_alg_not_allowed",
        ),
        "hs256 with the public key": (hs256_with_public_key(issuer), "token_alg_not_allowed"),
        "foreign key, issuer kid": (issuer.mint(key=attacker_key, kid=issuer.kid), "token_bad_signature"),
        "expired": (issuer.mint(ttl=-60), "token_expired"),
        "nbf in the future": (issuer.mint(claims={"nbf": int(time.time()) + 600}), "token_not_yet_valid"),
        "iat in the future": (issuer.mint(claims={"iat": int(time.time()) + 600}), "token_not_yet_valid"),
        "no exp": (issuer.mint(claims={"exp": None}), "token_claims_invalid"),
        "string exp": (issuer.mint(claims={"exp": "9999999999"}), "token_claims_invalid"),
        "wrong iss": (issuer.mint(iss="https://maskinporten.no/"), "token_unknown_issuer"),
        "iss differs by slash": (issuer.mint(iss=issuer.iss.rstrip("/")), "token_unknown_issuer"),
        "no iss": (issuer.mint(claims={"iss": None}), "token_unknown_issuer"),
        "jku to attacker": (
            issuer.mint(key=attacker.signing_key, kid=attacker.kid, headers={"jku": attacker.jwks_uri}),
            "token_unknown_kid",
        ),
        "x5u to attacker": (
            issuer.mint(key=attacker.signing_key, kid=issuer.kid, headers={"x5u": attacker.jwks_uri}),
            "token_bad_signature",
        ),
        "embedded jwk": (
            issuer.mint(
                key=attacker.signing_key, kid=issuer.kid, headers={"jwk": attacker.jwks()["keys"][0]}
            ),
            "token_bad_signature",
        ),
        "crit": (issuer.mint(headers={"crit": ["exp"], "exp": 1}), "token_crit_unsupported"),
        "truncated signature": (good[:-10], "token_bad_signature"),
        "empty signature": (good.rsplit(".", 1)[0] + ".", "token_bad_signature"),
        "signature of another token": (
            issuer.mint(org="958935420").rsplit(".", 1)[0] + "." + good.rsplit(".", 1)[1],
            "token_bad_signature",
        ),
        "idporten-shaped from maskinporten issuer": (
            issuer.mint(kind="idporten", pid=TEST_PID),
            "token_kind_mismatch",
        ),
        "maskinporten-shaped from idporten issuer": (
            issuer.idporten.mint(kind="maskinporten"),
            "token_kind_mismatch",
        ),
        "consumer not 0192 digits": (issuer.mint(org="12345"), "token_claims_invalid"),
        "consumer a string": (issuer.mint(claims={"consumer": "0192:991825827"}), "token_claims_invalid"),
        "scope a list": (issuer.mint(claims={"scope": ["ks:fiks"]}), "token_claims_invalid"),
        "pid not 11 digits": (issuer.idporten.mint(pid="1234"), "token_claims_invalid"),
        "PS256 not configured": (issuer.mint(alg="PS256"), "token_alg_not_allowed"),
    }
    for label, (token, internal) in cases.items():
        d, ctx = await run(stage, token)
        assert type(d) is Deny, label
        assert d.problem.internal_reason == internal, label
        denied(d, ctx, internal)
    assert attacker.fetch_count == 0


async def test_es256_header_against_an_rsa_kid_is_refused(issuer, issuer_factory):
    from cryptography.hazmat.primitives.asymmetric import ec

    s = await make_stage({"m": issuer.config(algorithms=["RS256", "ES256"])})
    try:
        eckey = ec.generate_private_key(ec.SECP256R1())
        d, ctx = await run(s, issuer.mint(key=eckey, kid=issuer.kid, alg="ES256"))
        denied(d, ctx, "token_alg_not_allowed")
    finally:
        await s.close()


async def test_audience_checked_when_configured(issuer):
    s = await make_stage({"m": issuer.config(audience="https://portvakt.example/api")})
    try:
        for aud, ok in [
            ("https://portvakt.example/api", True),
            (["other", "https://portvakt.example/api"], True),
            ("https://other.example/", False),
            (None, False),
        ]:
            d, ctx = await run(s, issuer.mint(audience=aud))
            if ok:
                assert d is ALLOW, aud
            else:
                denied(d, ctx, "token_bad_audience")
    finally:
        await s.close()


async def test_foreign_audience_refused_by_default_config(stage, issuer):
    d, ctx = await run(stage, issuer.mint(audience="anything"))
    denied(d, ctx, "token_bad_audience")


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
    real = tokens.VERIFIERS["RS256"]

    class Spy:
        def verify(self, *a):
            calls.append(1)
            return real.verify(*a)

    monkeypatch.setitem(tokens.VERIFIERS, "RS256", Spy())
    for _ in range(5):
        d, ctx2 = await run(stage, token)
        assert d is ALLOW and ctx2.audit["tokens"]["cached"] is True
        assert ctx2.token == ctx.token
    assert calls == []


async def test_cached_token_expires(stage, issuer, monkeypatch):
    token = issuer.mint(ttl=60)
    assert (await run(stage, token))[0] is ALLOW
    later = time.time() + 60 + 5 + 1  # past exp + leeway
    monkeypatch.setattr(tokens, "_now", lambda: later)
    d, ctx = await run(stage, token)
    denied(d, ctx, "token_expired")
    assert stage.cache_size == 0


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
    assert stage.cache_size == 0


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
        monkeypatch.setattr(tokens, "_now", lambda: t0)
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is False
        monkeypatch.setattr(tokens, "_now", lambda: t0 + 119)
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is True
        monkeypatch.setattr(tokens, "_now", lambda: t0 + 121)  # past the bound, before exp + leeway
        d, ctx = await run(s, token)
        assert d is ALLOW and ctx.audit["tokens"]["cached"] is False
    finally:
        await s.close()


async def test_cache_is_bounded(stage, issuer):
    stage.cache_max = 3
    for i in range(6):
        assert (await run(stage, issuer.mint(claims={"n": i})))[0] is ALLOW
    assert stage.cache_size == 3


# -- modes, reload, config -------------------------------------------------------------------


async def test_detect_mode_issuer_records_and_passes(issuer):
    s = await make_stage({"m": issuer.config(), "i": issuer.idporten.config(mode="detect")})
    try:
        d, ctx = await run(s, issuer.idporten.mint(ttl=-600))
        assert d is SKIP and ctx.token is None
        assert [(x.filter, x.reason) for x in ctx.detections] == [("tokens", "token_expired")]
        d, ctx = await run(s, issuer.mint(ttl=-600))
        denied(d, ctx, "token_expired")
    finally:
        await s.close()


async def test_all_detect_makes_filter_detect_and_off_ignores(issuer):
    s = await make_stage({"m": issuer.config(mode="detect"), "i": issuer.idporten.config(mode="off")})
    try:
        assert s.filters_for_route(stage_route())[0].mode is Mode.detect
        assert "jwks.i" not in s.readiness()
        d, ctx = await run(s, issuer.idporten.mint())
        assert d is SKIP and ctx.token is None
    finally:
        await s.close()


async def test_reload_keeps_keys_and_tokens_for_unchanged_issuers(issuer):
    registry = Registry()
    old = await make_stage(issuer.issuers_config(), registry=registry)
    token = issuer.mint()
    assert (await run(old, token))[0] is ALLOW
    fetches = issuer.fetch_count
    new = await make_stage(issuer.issuers_config(), start=False, registry=registry)
    new.adopt(old)
    await new.start()
    assert new.issuers["maskinporten"].store is old.issuers["maskinporten"].store
    assert issuer.fetch_count == fetches  # nothing refetched
    d, ctx = await run(new, token)
    assert d is ALLOW and ctx.audit["tokens"]["cached"] is True
    await old.close()  # retiring the old runtime must not close shared stores
    issuer.rotate()
    assert (await run(new, issuer.mint()))[0] is ALLOW
    await new.close()


async def test_reload_drops_tokens_when_issuer_config_changed(issuer):
    registry = Registry()
    old = await make_stage({"m": issuer.config()}, registry=registry)
    token = issuer.mint()
    assert (await run(old, token))[0] is ALLOW
    new = await make_stage({"m": issuer.config(audience="x")}, start=False, registry=registry)
    new.adopt(old)
    assert new.issuers["m"].store is old.issuers["m"].store  # same key source
    assert new.cache_size == 0
    d, ctx = await run(new, token)
    denied(d, ctx, "token_bad_audience")
    changed = await make_stage({"m": issuer.config(jwks_cache_seconds=60)}, start=False, registry=registry)
    changed.adopt(new)
    assert changed.issuers["m"].store is not new.issuers["m"].store
    for s in (old, new, changed):
        await s.close()


async def test_jwks_file_issuer(issuer, tmp_path):
    path = issuer.write_jwks_file(tmp_path / "jwks.json")
    s = await make_stage({"m": issuer.config(jwks_uri=None, jwks_file=path)})
    try:
        before = issuer.fetch_count
        assert (await run(s, issuer.mint()))[0] is ALLOW
        assert s.readiness() == {"jwks.m": "ok"}
        issuer.rotate()
        issuer.write_jwks_file(tmp_path / "jwks.json")
        assert (await run(s, issuer.mint()))[0] is ALLOW  # unknown kid re-reads the file
        assert issuer.fetch_count == before
    finally:
        await s.close()


def test_unusable_jwks_file_fails_the_build(tmp_path):
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}')
    for path in (str(tmp_path / "missing.json"), str(tmp_path / "bad.json")):
        cfg = config(
            {"m": {"kind": "maskinporten", "issuer": "https://m/", "jwks_file": path, "audience": "a"}}
        )
        with pytest.raises(ValueError, match="jwks_file"):
            build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))


def test_duplicate_iss_fails_the_build(tmp_path):
    cfg = config(
        {
            "a": {
                "kind": "maskinporten",
                "issuer": "https://m/",
                "jwks_uri": "https://m/jwk",
                "audience": "a",
            },
            "b": {"kind": "idporten", "issuer": "https://m/", "jwks_uri": "https://m/jwk2", "audience": "a"},
        }
    )
    with pytest.raises(ValueError, match="same iss"):
        build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))


def test_no_issuers_no_stage():
    assert build_stage(BuildEnv(config=config({}), base_dir=".", secrets={})) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"algorithms": ["RS256", "HS256"]}, "not allowed"),
        ({"algorithms": ["none"]}, "not allowed"),
        ({"algorithms": []}, "at least one"),
        ({"jwks_file": "x.json"}, "exactly one"),
        ({"jwks_uri": None}, "exactly one"),
        ({"jwks_uri": "http://maskinporten.no/jwk"}, "https"),
        ({"jwks_uri": "ftp://127.0.0.1/jwk"}, "https"),
        ({"leeway_seconds": -1}, "greater than or equal"),
        ({"unknown": 1}, "Extra inputs"),
        ({"audience": None}, "tokens_without_audience: bound_by_scope"),
        ({"audience": []}, "at least one"),
        ({"audience": ["ok", " "]}, "at least one"),
        ({"kind": "idporten", "audience": None}, "audience is required for an idporten issuer"),
        (
            {"kind": "idporten", "audience": None, "tokens_without_audience": "bound_by_scope"},
            "maskinporten only",
        ),
        ({"kind": "idporten", "tokens_without_audience": "bound_by_scope"}, "maskinporten only"),
        ({"tokens_without_audience": "sometimes"}, "refuse"),
    ],
)
def test_issuer_config_validation(fields, message):
    raw = {
        "kind": "maskinporten",
        "issuer": "https://maskinporten.no/",
        "jwks_uri": "https://maskinporten.no/jwk",
        "audience": "https://api.example/",
    }
    raw.update(fields)
    with pytest.raises(ValidationError, match=message):
        IssuerConfig.model_validate(raw)


def test_issuer_config_accepts_loopback_http_and_defaults():
    c = IssuerConfig.model_validate(
        {
            "kind": "idporten",
            "issuer": "https://idporten.no",
            "jwks_uri": "http://127.0.0.1:1/jwk",
            "audience": "https://api.example/",
        }
    )
    assert (
        c.algorithms == ["RS256", "RS384", "RS512"]
        and c.jwks_refetch_min_seconds == 30
        and c.leeway_seconds == 30
    )


@pytest.mark.parametrize(
    "acr, rank",
    [
        ("idporten-loa-low", 1),
        ("idporten-loa-substantial", 2),
        ("Level3", 2),
        ("idporten-loa-high", 3),
        ("Level4", 3),
        (None, 0),
        ("", 0),
        ("level4", 0),
        ("bogus", 0),
    ],
)
def test_acr_rank(acr, rank):
    assert acr_rank(acr) == rank


def test_acr_order():
    assert (
        acr_rank("idporten-loa-low")
        < acr_rank("idporten-loa-substantial")
        == acr_rank("Level3")
        < acr_rank("idporten-loa-high")
        == acr_rank("Level4")
    )


def test_reasons_registered():
    from gateway.problems import REASONS

    assert REASONS["invalid_token"][0] == 401
    assert REASONS["issuer_keys_unavailable"][0] == 503


def test_mint_token_cli_shapes(tmp_path):
    key = new_rsa_key()
    mp = payload_of(mint_token(key, None, "maskinporten", org="958935420"))
    assert mp["consumer"] == {"authority": "iso6523-actorid-upis", "ID": "0192:958935420"}
    assert (
        mp["scope"] == "ks:fiks"
        and mp["client_amr"] == "virksomhetssertifikat"
        and mp["exp"] - mp["iat"] == 600
    )
    ip = payload_of(mint_token(key, "k", "idporten", pid=TEST_PID, acr="Level3", ttl=-5))
    assert (
        ip["pid"] == TEST_PID and ip["acr"] == "Level3" and ip["exp"] < time.time() and "consumer" not in ip
    )
    with pytest.raises(ValueError):
        mint_token(key, "k", "idporten")


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


async def test_failed_reload_leaves_the_serving_stage_its_key_stores(issuer):
    # A reload whose runtime builds but fails to start is closed again (gateway/server.py):
    # closing that never-served stage must not close the key stores it adopted from the stage
    # still serving, or that stage stops refreshing keys (a rotated key stays unknown).
    registry = Registry()
    old = await make_stage(issuer.issuers_config(), registry=registry)
    failed = await make_stage(issuer.issuers_config(), start=False, registry=registry)
    failed.adopt(old)
    await failed.start()
    await failed.close()
    unstarted = await make_stage(issuer.issuers_config(), start=False, registry=registry)
    unstarted.adopt(old)
    await unstarted.close()  # a stage built but never started is closed with its runtime
    issuer.rotate()
    d, ctx = await run(old, issuer.mint())
    assert d is ALLOW, ctx.audit
    store = old.issuers["maskinporten"].store
    await old.close()
    assert store._closed  # the last stage holding it closes it
