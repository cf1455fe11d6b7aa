"""Unit tests of filters/jwks.py: JWK parsing rules and the key store's fetch behaviour."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from filters.jwks import JwksError, JwksStore, KeysUnavailable, check_jwks_uri, parse_jwk, parse_jwks
from tests.fixtures.issuer import new_rsa_key

RSA_ALGS = frozenset({"RS256", "RS384", "RS512"})
ALL = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384"})


def rsa_jwk(key=None, **extra):
    key = key or new_rsa_key()
    d = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    d.update(kid="r1", use="sig")
    d.update(extra)
    return {k: v for k, v in d.items() if v is not None}


def ec_jwk(curve=None, **extra):
    d = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(curve or ec.SECP256R1()).public_key()))
    d.update(kid="e1")
    d.update(extra)
    return d


def test_rsa_key_gets_the_configured_rsa_algorithms():
    k = parse_jwk(rsa_jwk(), ALL)
    assert k.kty == "RSA" and k.algorithms == {"RS256", "RS384", "RS512", "PS256"}
    assert isinstance(k.key, rsa.RSAPublicKey)


def test_jwk_alg_pins_the_algorithm():
    assert parse_jwk(rsa_jwk(alg="RS512"), ALL).algorithms == {"RS512"}
    with pytest.raises(JwksError, match="no configured algorithm"):
        parse_jwk(rsa_jwk(alg="PS512"), RSA_ALGS)


def test_ec_key_gets_the_algorithm_of_its_curve():
    assert parse_jwk(ec_jwk(), ALL).algorithms == {"ES256"}
    assert parse_jwk(ec_jwk(ec.SECP384R1()), ALL).algorithms == {"ES384"}
    with pytest.raises(JwksError, match="no configured algorithm"):
        parse_jwk(ec_jwk(), RSA_ALGS)
    with pytest.raises(JwksError, match="no configured algorithm"):
        parse_jwk(ec_jwk(alg="ES384"), ALL)  # a P-256 key claiming ES384


def test_private_jwk_yields_only_the_public_key():
    key = new_rsa_key()
    d = json.loads(RSAAlgorithm.to_jwk(key))
    d["kid"] = "p"
    d.pop("key_ops", None)
    assert isinstance(parse_jwk(d, RSA_ALGS).key, rsa.RSAPublicKey)


@pytest.mark.parametrize(
    "jwk, message",
    [
        ({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, "kty"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "o"}, "kty"),
        ("not-an-object", "not an object"),
        ({"kty": "RSA", "kid": "x", "n": "AQAB"}, "invalid RSA"),
        ({"kty": "EC", "kid": "x", "crv": "P-256", "x": "AA", "y": "AA"}, "invalid EC"),
    ],
)
def test_unusable_jwks(jwk, message):
    with pytest.raises(JwksError, match=message):
        parse_jwk(jwk, ALL)


def test_use_key_ops_kid_and_size_rules():
    with pytest.raises(JwksError, match="use="):
        parse_jwk(rsa_jwk(use="enc"), ALL)
    with pytest.raises(JwksError, match="key_ops"):
        parse_jwk(rsa_jwk(key_ops=["encrypt"]), ALL)
    assert parse_jwk(rsa_jwk(key_ops=["verify"], use=None), ALL).kid == "r1"
    with pytest.raises(JwksError, match="no kid"):
        parse_jwk(rsa_jwk(kid=None), ALL)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(JwksError, match="1024 bits"):
        parse_jwk(rsa_jwk(small), ALL)


def test_parse_jwks_document_rules():
    a, b = rsa_jwk(kid="a"), rsa_jwk(kid="b")
    keys, skipped = parse_jwks({"keys": [a, b, {"kty": "oct", "kid": "h", "k": "eA"}]}, RSA_ALGS)
    assert set(keys) == {"a", "b"} and len(skipped) == 1
    keys, skipped = parse_jwks({"keys": [a, rsa_jwk(kid="a"), b]}, RSA_ALGS)
    assert set(keys) == {"b"} and "duplicate kid" in skipped[0]  # an ambiguous kid is never used
    for doc in ({}, {"keys": {}}, [], {"keys": []}, {"keys": [{"kty": "oct", "kid": "h", "k": "eA"}]}):
        with pytest.raises(JwksError):
            parse_jwks(doc, RSA_ALGS)


@pytest.mark.parametrize(
    "uri, ok",
    [
        ("https://maskinporten.no/jwk", True),
        ("http://127.0.0.1:8080/jwk", True),
        ("http://localhost/jwk", True),
        ("http://[::1]:1/jwk", True),
        ("http://maskinporten.no/jwk", False),
        ("http://127.0.0.1.evil.no/jwk", False),
        ("file:///etc/passwd", False),
    ],
)
def test_jwks_uri_rule(uri, ok):
    if ok:
        assert check_jwks_uri(uri) == uri
    else:
        with pytest.raises(ValueError):
            check_jwks_uri(uri)


# -- the store against a real local server ---------------------------------------------------


class Server:
    """A JWKS endpoint whose answer the test controls."""

    def __init__(self):
        self.doc: object = {"keys": [rsa_jwk(kid="k1")]}
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.body: bytes | None = None

    async def handle(self, request):
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(self.doc, status=self.status)


@pytest.fixture
async def jwks_server(aiohttp_server):
    s = Server()
    app = web.Application()
    app.router.add_get("/jwk", s.handle)
    srv = await aiohttp_server(app, host="127.0.0.1")
    s.uri = str(srv.make_url("/jwk"))
    return s


def store_for(uri, **kw):
    args = dict(
        uri=uri,
        file=None,
        algorithms=["RS256"],
        cache_seconds=3600,
        refetch_min_seconds=30,
        timeout_seconds=2,
        retry_max_seconds=0.2,
    )
    args.update(kw)
    return JwksStore("t", **args)


async def test_start_prefetches_and_known_kids_cost_no_fetch(jwks_server):
    s = store_for(jwks_server.uri)
    assert s.readiness().startswith("down: ")
    await s.start()
    try:
        assert s.readiness() == "ok" and jwks_server.hits == 1
        for _ in range(10):
            assert (await s.key_for("k1")).kid == "k1"
        assert jwks_server.hits == 1
    finally:
        await s.close()


async def test_unknown_kid_single_flight_and_throttle(jwks_server):
    s = store_for(jwks_server.uri)
    await s.start()
    try:
        jwks_server.delay = 0.1
        results = await asyncio.gather(*(s.key_for("nope") for _ in range(25)))
        assert results == [None] * 25 and jwks_server.hits == 2
        assert await s.key_for("nope") is None and jwks_server.hits == 2  # throttled for 30 s
    finally:
        await s.close()


async def test_cache_age_refreshes_in_background(jwks_server):
    s = store_for(jwks_server.uri, cache_seconds=0.05, refetch_min_seconds=0)
    await s.start()
    try:
        await asyncio.sleep(0.1)
        jwks_server.doc = {"keys": [rsa_jwk(kid="k2")]}
        assert (await s.key_for("k1")).kid == "k1"  # served from cache while the refresh runs
        for _ in range(50):
            if s.lookup("k2") is not None:
                break
            await asyncio.sleep(0.02)
        assert s.lookup("k2") is not None and s.lookup("k1") is None
    finally:
        await s.close()


@pytest.mark.parametrize("breakage", ["status", "not json", "no usable key", "too big"])
async def test_failed_refresh_keeps_last_good_keys(jwks_server, breakage):
    s = store_for(jwks_server.uri, refetch_min_seconds=0)
    await s.start()
    try:
        if breakage == "status":
            jwks_server.status = 503
        elif breakage == "not json":
            jwks_server.body = b"<html>"
        elif breakage == "no usable key":
            jwks_server.doc = {"keys": [{"kty": "oct", "kid": "h", "k": "eA"}]}
        else:
            jwks_server.body = b'{"keys": [' + b" " * (1 << 20) + b"]}"
        assert await s.key_for("other") is None
        assert (await s.key_for("k1")).kid == "k1"
        assert s.readiness().startswith("fallback: ")
    finally:
        await s.close()


async def test_never_obtained_raises_and_retries_in_background(jwks_server):
    jwks_server.status = 500
    s = store_for(jwks_server.uri, refetch_min_seconds=30)
    await s.start()  # does not raise
    try:
        assert "HTTP 500" in s.readiness() and s.readiness().startswith("down: ")
        with pytest.raises(KeysUnavailable):
            await s.key_for("k1")
        jwks_server.status = 200
        for _ in range(100):
            if s.obtained:
                break
            await asyncio.sleep(0.02)
        assert s.obtained and s.readiness() == "ok"
        assert (await s.key_for("k1")).kid == "k1"
    finally:
        await s.close()


async def test_unreachable_uri_does_not_fail_start():
    s = store_for("http://127.0.0.1:9/jwk")  # discard port: connection refused
    await s.start()
    try:
        assert s.readiness().startswith("down: keys not obtained (cannot connect")
    finally:
        await s.close()
    assert s._retry_task is None or s._retry_task.done()


async def test_redirects_are_not_followed(aiohttp_server, jwks_server):
    app = web.Application()

    async def redirect(request):
        raise web.HTTPFound(jwks_server.uri)

    app.router.add_get("/jwk", redirect)
    srv = await aiohttp_server(app, host="127.0.0.1")
    s = store_for(str(srv.make_url("/jwk")))
    await s.start()
    try:
        assert "HTTP 302" in s.readiness() and jwks_server.hits == 0
    finally:
        await s.close()
