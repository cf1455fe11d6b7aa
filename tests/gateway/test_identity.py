"""gateway/identity/: identity headers from verified facts, the ES256 assertion, key rotation."""

from __future__ import annotations

import argparse
import base64
import json
import os
import time

import jwt
import pytest

from gateway import identity
from gateway.chain import BuildEnv
from gateway.identity import (
    Forwarder,
    build_forwarder,
    keys_create,
    keys_prune,
    keys_rotate,
    normalize_header_name,
)
from tests.gateway.helpers_audit import (
    PID,
    certificate,
    idporten,
    integration,
    make_config,
    make_ctx,
    maskinporten,
)

ALL_HEADERS = [
    "X-Portvakt-Consumer-Org",
    "X-Portvakt-Integration-Id",
    "X-Portvakt-Integration-Org",
    "X-Portvakt-Certificate-Org",
    "X-Portvakt-Scope",
    "X-Portvakt-Acr",
    "X-Portvakt-Client-Amr",
    "X-Portvakt-Target-Org",
    "X-Portvakt-Legal-Basis",
    "X-Portvakt-Person",
    "X-Portvakt-Assertion",
    "Client-Cert",
    "Client-Cert-Chain",
]


def forwarder(tmp_path=None, **assertion) -> Forwarder:
    cfg = make_config(identity={"assertion": assertion} if assertion else None)
    return build_forwarder(BuildEnv(config=cfg, base_dir=str(tmp_path or "."), secrets={}))


def decode(token: str, fwd: Forwarder, aud: str = "case", **kw):
    header = jwt.get_unverified_header(token)
    jwk = next(k for k in fwd.jwks()["keys"] if k["kid"] == header["kid"])
    return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience=aud, issuer="portvakt", **kw)


@pytest.mark.parametrize("name", ALL_HEADERS)
@pytest.mark.parametrize(
    "variant", [str.lower, str.upper, lambda n: n.replace("-", "_"), lambda n: n.swapcase().replace("-", "_")]
)
def test_every_identity_header_is_stripped_in_any_spelling(name, variant):
    fwd = forwarder()
    assert normalize_header_name(variant(name)) in fwd.strip_names


def test_strip_names_cover_everything_headers_can_set():
    fwd = forwarder()
    cfg = make_config()
    ctx = make_ctx(
        cfg,
        token=maskinporten(),
        integration=integration(),
        certificate=certificate(),
        target_org="958935420",
    )
    ctx.tls.peer_chain_der = (b"leaf", b"intermediate")
    set_names = {normalize_header_name(n) for n in fwd.headers(ctx)}
    assert set_names <= fwd.strip_names
    assert fwd.strip_prefixes == ("x-portvakt-",)


def test_extra_legacy_names_are_stripped():
    cfg = make_config(identity={"strip_extra": ["X-Authenticated_Org"]})
    fwd = build_forwarder(BuildEnv(config=cfg, base_dir=".", secrets={}))
    assert "x-authenticated-org" in fwd.strip_names


def test_headers_carry_verified_facts_only():
    fwd = forwarder()
    cfg = make_config()
    ctx = make_ctx(
        cfg,
        token=maskinporten(scopes=("ks:fiks", "a:b")),
        integration=integration(),
        certificate=certificate(),
        target_org="958935420",
    )
    h = fwd.headers(ctx)
    assert h["X-Portvakt-Consumer-Org"] == "991825827"
    assert h["X-Portvakt-Integration-Id"] == "3f1c8f6e-8d7e-4b8e-9a43-2b1e5f8c7a10"
    assert h["X-Portvakt-Integration-Org"] == "991825827"
    assert h["X-Portvakt-Certificate-Org"] == "991825827"
    assert h["X-Portvakt-Scope"] == "a:b ks:fiks"
    assert h["X-Portvakt-Client-Amr"] == "virksomhetssertifikat"
    assert h["X-Portvakt-Target-Org"] == "958935420"
    # non-ASCII legal basis: percent-encoded UTF-8
    assert h["X-Portvakt-Legal-Basis"] == "forvaltningsloven %C2%A7 13b"
    assert "X-Portvakt-Person" not in h and "X-Portvakt-Acr" not in h
    assert h["Client-Cert"] == ":" + base64.b64encode(certificate().der).decode() + ":"


def test_nothing_unverified_is_forwarded():
    fwd = forwarder()
    ctx = make_ctx(make_config(), integration_id_claimed="spoofed")
    h = fwd.headers(ctx)
    assert set(h) == {"X-Portvakt-Legal-Basis", "X-Portvakt-Assertion"}


def test_person_only_where_the_route_opts_in():
    fwd = forwarder()
    cfg = make_config()
    on = fwd.headers(make_ctx(cfg, "cases", token=idporten()))
    off = fwd.headers(make_ctx(cfg, "open", token=idporten()))
    assert on["X-Portvakt-Person"] == PID and on["X-Portvakt-Acr"] == "idporten-loa-high"
    assert "X-Portvakt-Person" not in off and "Client-Cert" not in off
    assert "pid" not in jwt.decode(off["X-Portvakt-Assertion"], options={"verify_signature": False})
    assert jwt.decode(on["X-Portvakt-Assertion"], options={"verify_signature": False})["pid"] == PID


def test_client_cert_chain_from_tls():
    fwd = forwarder()
    ctx = make_ctx(make_config(), certificate=certificate(der=b"leaf"))
    ctx.tls.peer_chain_der = (b"leaf", b"inter1", b"inter2")
    h = fwd.headers(ctx)
    assert h["Client-Cert"] == ":bGVhZg==:"
    assert h["Client-Cert-Chain"] == ":aW50ZXIx:, :aW50ZXIy:"


def test_assertion_verifies_against_jwks_with_claims():
    fwd = forwarder()
    ctx = make_ctx(
        make_config(),
        request_id="rid-42",
        token=maskinporten(),
        integration=integration(),
        target_org="958935420",
    )
    token = fwd.headers(ctx)["X-Portvakt-Assertion"]
    claims = decode(token, fwd)
    assert "request_id" not in claims  # per request: the X-Request-Id header
    assert claims["route"] == "cases" and claims["service"] == "saksbehandling"
    assert claims["consumer_org"] == "991825827" and claims["integration_id"] == integration().id
    assert claims["target_org"] == "958935420" and claims["legal_basis"] == "forvaltningsloven § 13b"
    assert claims["exp"] - claims["iat"] == 60
    assert len(claims["jti"]) >= 16
    assert ctx.audit["identity"]["assertion_jti"] == claims["jti"]
    with pytest.raises(jwt.InvalidAudienceError):
        decode(token, fwd, aud="other-upstream")


def test_assertion_is_signed_once_per_principal_and_window():
    fwd = forwarder(lifetime_seconds=60)
    now = [1_000_000.0]
    fwd.clock = lambda: now[0]
    cfg = make_config()
    a = make_ctx(
        cfg, request_id="r1", token=maskinporten(), integration=integration(), target_org="958935420"
    )
    b = make_ctx(
        cfg, request_id="r2", token=maskinporten(), integration=integration(), target_org="958935420"
    )
    ta, tb = fwd.headers(a)["X-Portvakt-Assertion"], fwd.headers(b)["X-Portvakt-Assertion"]
    assert ta == tb
    assert a.audit["identity"]["assertion_jti"] == b.audit["identity"]["assertion_jti"]
    # another principal (target organisation), another route: another assertion with its own facts
    other = make_ctx(cfg, token=maskinporten(), integration=integration(), target_org="974760673")
    to = fwd.headers(other)["X-Portvakt-Assertion"]
    assert to != ta and jwt.decode(to, options={"verify_signature": False})["target_org"] == "974760673"
    elsewhere = make_ctx(cfg, "open", token=maskinporten(), integration=integration(), target_org="958935420")
    assert fwd.headers(elsewhere)["X-Portvakt-Assertion"] != ta
    # half the lifetime later a fresh one is signed: a reused assertion always has >= 30 s left
    now[0] += 29
    assert (
        fwd.headers(make_ctx(cfg, token=maskinporten(), integration=integration(), target_org="958935420"))[
            "X-Portvakt-Assertion"
        ]
        == ta
    )
    now[0] += 1
    fresh = fwd.headers(
        make_ctx(cfg, token=maskinporten(), integration=integration(), target_org="958935420")
    )["X-Portvakt-Assertion"]
    assert fresh != ta
    assert jwt.decode(fresh, options={"verify_signature": False})["iat"] == 1_000_030
    # a clock stepping back does not stretch a cached assertion's life either
    now[0] -= 100
    back = fwd.headers(make_ctx(cfg, token=maskinporten(), integration=integration(), target_org="958935420"))
    assert back["X-Portvakt-Assertion"] not in (ta, fresh)


def test_assertion_per_request_when_reuse_is_off():
    fwd = forwarder(reuse_seconds=0)
    cfg = make_config()
    tokens = {fwd.headers(make_ctx(cfg, token=maskinporten()))["X-Portvakt-Assertion"] for _ in range(3)}
    assert len(tokens) == 3


def test_assertion_facts_never_leak_between_principals():
    """A person's assertion must never be served to another person on the same route."""
    fwd = forwarder()
    cfg = make_config()
    one = fwd.headers(make_ctx(cfg, "cases", token=idporten()))["X-Portvakt-Assertion"]
    other = "01017000027" if PID != "01017000027" else "01017000035"
    two = fwd.headers(make_ctx(cfg, "cases", token=idporten(pid=other)))["X-Portvakt-Assertion"]
    assert one != two
    assert jwt.decode(one, options={"verify_signature": False})["pid"] == PID
    assert jwt.decode(two, options={"verify_signature": False})["pid"] == other


def test_assertion_expires():
    fwd = forwarder(lifetime_seconds=5)
    fwd.clock = lambda: time.time() - 10
    token = fwd.headers(make_ctx(make_config(), token=maskinporten()))["X-Portvakt-Assertion"]
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(token, fwd)


def test_ephemeral_key_survives_reload():
    cfg = make_config()
    a = build_forwarder(BuildEnv(config=cfg, base_dir=".", secrets={}))
    b = build_forwarder(BuildEnv(config=cfg, base_dir=".", secrets={}))
    b.adopt(a)
    assert a.jwks() == b.jwks()
    assert b.readiness() == {"assertion_keys": "fallback: ephemeral key"}


def keyed_forwarder(key_dir, **kw) -> Forwarder:
    return forwarder(key_dir=str(key_dir), manifest_poll_seconds=0, **kw)


def test_rotation_publishes_first_then_signs_and_retires(tmp_path):
    kd = tmp_path / "keys"
    t0 = time.time()
    old_kid = keys_create(str(kd), max_lifetime=120, now=t0 - 10)
    assert oct(os.stat(kd / f"{old_kid}.pem").st_mode & 0o777) == "0o600"
    fwd = keyed_forwarder(kd)
    ctx = make_ctx(make_config(), token=maskinporten())
    old_token = fwd.sign(ctx)
    assert jwt.get_unverified_header(old_token)["kid"] == old_kid

    # rotate with a publish delay: the new key is in the JWKS at once but does not sign yet
    new_kid = keys_rotate(str(kd), publish_delay=30, now=t0)
    assert fwd.refresh_keys() is True
    assert {k["kid"] for k in fwd.jwks()["keys"]} == {old_kid, new_kid}
    assert jwt.get_unverified_header(fwd.sign(ctx))["kid"] == old_kid
    decode(old_token, fwd)

    # after the delay the new key signs, without a reload; the old assertion still verifies
    fwd.clock = lambda: t0 + 31
    assert jwt.get_unverified_header(fwd.sign(ctx))["kid"] == new_kid
    assert {k["kid"] for k in fwd.jwks()["keys"]} == {old_kid, new_kid}
    decode(old_token, fwd, leeway=100)

    # the old key leaves the JWKS once every assertion it signed has expired, then prune deletes it
    manifest = json.loads((kd / "manifest.json").read_text())
    retire = next(e["retire_at"] for e in manifest["keys"] if e["kid"] == old_kid)
    assert retire == pytest.approx(t0 + 30 + 120)
    fwd.clock = lambda: retire + 1
    assert [k["kid"] for k in fwd.jwks()["keys"]] == [new_kid]
    assert keys_prune(str(kd), now=t0) == []
    assert keys_prune(str(kd), now=retire + 1) == [old_kid]
    assert not (kd / f"{old_kid}.pem").exists()
    assert keyed_forwarder(kd).jwks()["keys"][0]["kid"] == new_kid


def test_rotation_with_zero_delay_switches_at_once(tmp_path):
    kd = tmp_path / "keys"
    old_kid = keys_create(str(kd))
    fwd = keyed_forwarder(kd)
    old_token = fwd.sign(make_ctx(make_config()))
    new_kid = keys_rotate(str(kd), publish_delay=0)
    fwd.refresh_keys()
    assert jwt.get_unverified_header(fwd.sign(make_ctx(make_config())))["kid"] == new_kid
    assert decode(old_token, fwd)["iss"] == "portvakt"
    assert old_kid != new_kid


def test_lifetime_longer_than_manifest_promise_is_refused(tmp_path):
    kd = tmp_path / "keys"
    keys_create(str(kd), max_lifetime=30)
    with pytest.raises(ValueError, match="max_lifetime"):
        keyed_forwarder(kd, lifetime_seconds=60)


def test_unreadable_manifest_keeps_loaded_keys(tmp_path):
    kd = tmp_path / "keys"
    kid = keys_create(str(kd))
    fwd = keyed_forwarder(kd)
    (kd / "manifest.json").write_text("{broken")
    assert fwd.refresh_keys() is False
    assert fwd.readiness()["assertion_keys"].startswith("fallback:")
    assert jwt.get_unverified_header(fwd.sign(make_ctx(make_config())))["kid"] == kid


async def test_manifest_is_polled(tmp_path):
    kd = tmp_path / "keys"
    keys_create(str(kd))
    fwd = forwarder(key_dir=str(kd), manifest_poll_seconds=0.02)
    await fwd.start()
    try:
        new_kid = keys_rotate(str(kd), publish_delay=0)
        for _ in range(200):
            if any(k["kid"] == new_kid for k in fwd.jwks()["keys"]):
                break
            import asyncio

            await asyncio.sleep(0.01)
        assert any(k["kid"] == new_kid for k in fwd.jwks()["keys"])
    finally:
        await fwd.close()


def test_cli_commands(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="command")
    identity.register_commands(sp)
    kd = str(tmp_path / "k")
    for argv in (["create", kd], ["rotate", kd, "--publish-delay", "0"], ["prune", kd], ["list", kd]):
        args = ap.parse_args(["assertion-keys", *argv])
        assert args.func(args) == 0
    assert len(json.loads(capsys.readouterr().out.split("pruned nothing\n")[1])["keys"]) == 2
    args = ap.parse_args(["assertion-keys", "create", kd])
    assert args.func(args) == 1  # exists already: use rotate


def test_reused_assertion_always_has_time_left():
    fwd = forwarder(lifetime_seconds=10, reuse_seconds=3600)
    now = [1_000_000.0]
    fwd.clock = lambda: now[0]
    cfg = make_config()
    first = fwd.headers(make_ctx(cfg, token=maskinporten()))["X-Portvakt-Assertion"]
    now[0] += 9.5  # 0.5 s before it expires: not served again
    again = fwd.headers(make_ctx(cfg, token=maskinporten()))["X-Portvakt-Assertion"]
    assert again != first
