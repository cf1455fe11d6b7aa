"""Unit tests of filters/persons: cookie codec, open-redirect guard, memory store, navigation
detection and config checks, on hand-built inputs."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from filters.persons import config_problems, is_navigation
from filters.persons.config import SessionStoreConfig
from filters.persons.cookies import CookieCodec, cookie_values, strip_cookies
from filters.persons.redirects import safe_redirect
from filters.persons.store import MemoryStore
from gateway.config import ConfigError, parse_config

KEY_A = ("a", "a" * 40)
KEY_B = ("b", "b" * 40)


def test_cookie_codec_roundtrip_rotation_and_tamper():
    old = CookieCodec([KEY_A])
    v = old.seal("c", b"ticket")
    assert old.open("c", v) == b"ticket"
    rotated = CookieCodec([KEY_B, KEY_A])  # new key first, old one still opens
    assert rotated.open("c", v) == b"ticket"
    assert rotated.seal("c", b"x").startswith("v1.b.")
    assert CookieCodec([KEY_B]).open("c", v) is None  # old key retired
    assert old.open("other-name", v) is None  # AAD binds the cookie name
    assert old.open("c", v.replace("v1.a.", "v1.b.")) is None
    for i in range(6, len(v)):
        t = v[:i] + ("A" if v[i] != "A" else "B") + v[i + 1 :]
        assert old.open("c", t) is None, i
    for junk in ("", "v1", "v1.a", "v1.a.!!!", "v2.a.AAAA", "x" * 5000):
        assert old.open("c", junk) is None


def test_cookie_parsing_and_stripping():
    assert cookie_values(["a=1; s=2", "s=3"], "s") == ["2", "3"]
    assert (
        strip_cookies(["a=1; __Host-portvakt-session=x; b=2"], lambda n: n.startswith("__Host-portvakt"))
        == "a=1; b=2"
    )
    assert strip_cookies(["__Host-portvakt-session=x"], lambda n: True) is None


@pytest.mark.parametrize(
    "target,want",
    [
        ("/app/x?y=1", "/app/x?y=1"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("/%2F%2Fevil.example", "/"),
        ("/%252F%252Fevil.example", "/"),
        ("/\t/evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("app", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_safe_redirect(target, want):
    assert safe_redirect(target) == want


def test_safe_redirect_allowed_hosts():
    hosts = frozenset({"app.example"})
    assert safe_redirect("https://app.example/x", hosts) == "https://app.example/x"
    assert safe_redirect("https://app.example@evil.example/", hosts) == "/"
    assert safe_redirect("http://app.example/x", hosts) == "/"
    assert safe_redirect("https://evil.example/x", hosts) == "/"


async def test_memory_store_ttl_take_lock_and_counters():
    s = MemoryStore(SessionStoreConfig())
    await s.set("k", b"v", 0.05)
    assert await s.get("k") == b"v"
    await asyncio.sleep(0.08)
    assert await s.get("k") is None
    await s.set("a", b"1", 10)
    assert await s.take("a") == b"1" and await s.take("a") is None  # single use
    t = await s.lock("l", 10)
    assert t and await s.lock("l", 10) is None
    await s.unlock("l", "not-the-token")
    assert await s.lock("l", 10) is None
    await s.unlock("l", t)
    assert await s.lock("l", 10)
    assert [await s.incr("c", 10) for _ in range(3)] == [1, 2, 3]
    await s.add_member("i", "x", 10)
    await s.add_member("i", "y", 10)
    assert await s.members("i") == {"x", "y"}


def _ctx(method="GET", **headers):
    class C:
        pass

    c = C()
    c.method = method
    c.headers = CIMultiDictProxy(CIMultiDict(headers))
    return c


@pytest.mark.parametrize(
    "method,headers,nav",
    [
        ("GET", {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}, True),
        ("GET", {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Accept": "text/html"}, False),
        ("GET", {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}, False),
        ("GET", {"Accept": "text/html,application/xhtml+xml"}, True),
        ("GET", {"Accept": "application/json"}, False),
        ("POST", {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}, False),
    ],
)
def test_navigation_or_xhr(method, headers, nav):
    assert is_navigation(_ctx(method, **headers)) is nav


BASE = """
server: {plain_http: true}
upstreams: {a: {url: "http://127.0.0.1:1"}}
"""
PERSONS = """
persons:
  provider: {issuer: "https://idporten.example", client_id: c, client_auth: client_secret_basic, client_secret: s}
  cookie_keys: [{id: k1, secret: "0123456789012345678901234567890123"}]
"""


def test_config_checks():
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + "routes: [{name: r, upstream: a, person: {}}]\n", "x.yaml")
    assert "x.yaml: routes[0].person: needs the persons: section (login)" in e.value.problems
    with pytest.raises(ConfigError) as e:
        parse_config(
            BASE + PERSONS + "routes: [{name: r, upstream: a, match: {path_prefix: /portvakt/x}}]\n", "x.yaml"
        )
    assert any("reserved" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(BASE.replace("plain_http: true", "plain_http: true, workers: 2") + PERSONS, "x.yaml")
    assert any("persons.store.backend" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + PERSONS.replace("0123456789012345678901234567890123", "short"), "x.yaml")
    assert any("cookie_keys[0].secret" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(
            BASE + PERSONS + "routes: [{name: r, upstream: a, person: {min_acr: Level5}}]\n", "x.yaml"
        )
    assert any("min_acr" in p for p in e.value.problems)
    cfg = parse_config(
        BASE + PERSONS + "routes: [{name: r, upstream: a, person: {min_acr: Level4}}]\n", "x.yaml"
    )
    assert cfg.persons.idle_timeout_seconds == 1800 and cfg.persons.absolute_timeout_seconds == 7200
    assert cfg.persons.cookie_name == "__Host-portvakt-session"
    assert config_problems(cfg) == []
