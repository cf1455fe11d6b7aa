"""filters/issuers: modes, reloads (key stores and verified tokens kept or dropped), the
``issuers:`` config model, ID-porten levels, reason ids, the mint-token CLI.

Unit tests on hand-built contexts, against a real local JWKS issuer (tests/fixtures/issuer.py)."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from filters.issuers import IssuerConfig, acr_rank, build_stage
from gateway.chain import ALLOW, SKIP, BuildEnv, Mode
from gateway.dev.issuer import mint_token
from gateway.resources import Registry
from tests.filters.helpers_issuers import (
    config,
    denied,
    make_stage,
    payload_of,
    run,
    stage_route,
)
from tests.fixtures.issuer import TEST_PID, new_rsa_key

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
    assert len(new.verified) == 0
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
