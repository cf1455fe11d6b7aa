"""filters/ingress.py on hand-built contexts: one table per check, each row a request shape and
the reason (or None for allowed) it must produce."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from filters import ingress
from gateway import problems
from gateway.chain import Allow, BuildEnv, Deny, Mode, run_chain
from gateway.config import Config
from gateway.context import RequestContext
from gateway.pipeline import chain_positions


def _config(ingress_cfg: dict[str, Any] | None = None, match: dict[str, Any] | None = None) -> Config:
    return Config.model_validate(
        {
            "server": {"plain_http": True},
            "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
            "routes": [{"name": "r", "upstream": "u", "match": match or {"path_prefix": "/api/"}}],
            "ingress": ingress_cfg or {},
        }
    )


def _filter(
    ingress_cfg: dict[str, Any] | None = None, match: dict[str, Any] | None = None
) -> ingress.IngressFilter:
    cfg = _config(ingress_cfg, match)
    stage = ingress.build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    (f,) = stage.filters_for_route(cfg.routes[0])
    assert f.name == "ingress" and f.name in chain_positions()
    return f


def _ctx(
    method: str = "GET",
    raw_path: str = "/api/x",
    query: str = "",
    host: str = "localhost:8443",
    ip: str = "127.0.0.1",
    headers: list[tuple[str, str]] | None = None,
) -> RequestContext:
    addr = ipaddress.ip_address(ip)
    return RequestContext(
        request_id="rid",
        method=method,
        raw_path=raw_path,
        path=raw_path,
        query_string=query,
        host=host,
        scheme="https",
        peer_ip=addr,
        client_ip=addr,
        headers=CIMultiDictProxy(CIMultiDict(headers or [("Host", host)])),
        request=None,  # type: ignore[arg-type]
        runtime=None,  # type: ignore[arg-type]
    )


async def _reason(f: ingress.IngressFilter, ctx: RequestContext) -> str | None:
    d = await f.check(ctx)
    if isinstance(d, Allow):
        return None
    assert isinstance(d, Deny)
    return d.problem.log_reason


def test_reasons_registered_with_documented_statuses():
    expected = {
        "ip_denied": 403,
        "host_not_allowed": 421,
        "method_not_allowed": 405,
        "uri_too_long": 414,
        "headers_too_large": 431,
        "body_too_large": 413,
        "bad_path": 400,
        "request_smuggling": 400,
    }
    assert {r: problems.REASONS[r][0] for r in expected} == expected
    assert ingress.BODY_TOO_LARGE == "body_too_large"


CIDR_CASES = [
    # (allow, deny, client ip, expected internal reason)
    ([], [], "203.0.113.9", None),
    ([], ["203.0.113.0/24"], "203.0.113.9", "ip_in_deny_list"),
    ([], ["203.0.113.0/24"], "::ffff:203.0.113.9", "ip_in_deny_list"),  # mapped IPv6 normalised
    ([], ["::ffff:203.0.113.0/120"], "203.0.113.9", "ip_in_deny_list"),  # mapped CIDR normalised
    ([], ["2001:db8::/32"], "2001:db8::1", "ip_in_deny_list"),
    ([], ["2001:db8::/32"], "2001:db9::1", None),
    (["10.0.0.0/8"], [], "10.1.2.3", None),
    (["10.0.0.0/8"], [], "::ffff:10.1.2.3", None),
    (["10.0.0.0/8"], [], "11.0.0.1", "ip_not_in_allow_list"),
    (["10.0.0.0/8"], [], "::1", "ip_not_in_allow_list"),
    (["10.0.0.0/8", "::1/128"], [], "::1", None),
    (["10.0.0.0/8"], ["10.9.0.0/16"], "10.9.1.1", "ip_in_deny_list"),  # deny wins
    (["10.0.0.5"], [], "10.0.0.5", None),  # a bare address is a /32
]


@pytest.mark.parametrize("allow, deny, ip, expected", CIDR_CASES)
async def test_cidr_allow_deny(allow, deny, ip, expected):
    f = _filter({"allow_cidrs": allow, "deny_cidrs": deny})
    assert await _reason(f, _ctx(ip=ip)) == expected


async def test_ip_denied_is_403_problem():
    f = _filter({"deny_cidrs": ["127.0.0.0/8"]})
    d = await f.check(_ctx())
    assert isinstance(d, Deny) and d.problem.reason == "ip_denied" and d.problem.status == 403


HOST_CASES = [
    # (global allowed_hosts, route hosts, Host header, expected)
    ([], [], "anything.example:8443", None),
    (["api.example.no"], [], "api.example.no", None),
    (["api.example.no"], [], "API.Example.NO.:443", None),
    (["api.example.no"], [], "evil.example", "host_not_allowed"),
    (["api.example.no"], [], "", "host_not_allowed"),
    ([], ["a.example"], "a.example:8443", None),
    ([], ["a.example"], "b.example", "host_not_allowed"),
    (["a.example", "b.example"], ["a.example"], "b.example", "host_not_allowed"),  # route narrows
    (["::1"], [], "[::1]:8443", None),
    (["127.0.0.1"], [], "127.0.0.1:8443", None),
]


@pytest.mark.parametrize("allowed, route_hosts, host, expected", HOST_CASES)
async def test_host_allow_list(allowed, route_hosts, host, expected):
    f = _filter({"allowed_hosts": allowed}, {"path_prefix": "/api/", "hosts": route_hosts})
    d = await f.check(_ctx(host=host))
    if expected is None:
        assert isinstance(d, Allow)
    else:
        assert isinstance(d, Deny) and d.problem.reason == expected and d.problem.status == 421


@pytest.mark.parametrize(
    "methods, method, allowed",
    [
        (["GET", "POST"], "GET", True),
        (["GET", "POST"], "POST", True),
        (["GET", "POST"], "DELETE", False),
        (["GET"], "HEAD", False),
        (["GET"], "CONNECT", False),
        (["GET"], "get", False),  # methods are case-sensitive (RFC 9110 9.1)
    ],
)
async def test_method_allow_list_with_allow_header(methods, method, allowed):
    f = _filter(match={"path_prefix": "/api/", "methods": methods})
    d = await f.check(_ctx(method=method))
    if allowed:
        assert isinstance(d, Allow)
    else:
        assert isinstance(d, Deny)
        assert d.problem.reason == "method_not_allowed" and d.problem.status == 405
        assert d.problem.headers["Allow"] == ", ".join(methods)


@pytest.mark.parametrize(
    "path, query, expected",
    [
        ("/api/" + "a" * 95, "", None),  # exactly 100
        ("/api/" + "a" * 96, "", "uri_too_long"),
        ("/api/x", "q=" + "b" * 91, None),  # 6 + 1 + 93 = 100
        ("/api/x", "q=" + "b" * 92, "uri_too_long"),
    ],
)
async def test_uri_size(path, query, expected):
    f = _filter({"max_uri_bytes": 100})
    d = await f.check(_ctx(raw_path=path, query=query))
    assert (None if isinstance(d, Allow) else d.problem.reason) == expected
    if expected:
        assert d.problem.status == 414


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([("Host", "h")] + [(f"X-{i}", "v") for i in range(9)], None),  # 10 lines
        ([("Host", "h")] + [(f"X-{i}", "v") for i in range(10)], "too_many_headers"),
        ([("Host", "h")] + [("X-Dup", "v")] * 10, "too_many_headers"),  # repeated names count
        ([("Host", "h"), ("X-Big", "v" * 180)], None),  # 4+1+4 + 5+180+4 = 198
        ([("Host", "h"), ("X-Big", "v" * 183)], "header_bytes"),  # 201
        ([("Host", "h"), ("X-Big", "æ" * 92)], "header_bytes"),  # counted in UTF-8 bytes
    ],
)
async def test_header_count_and_bytes(headers, expected):
    f = _filter({"max_headers": 10, "max_header_bytes": 200})
    d = await f.check(_ctx(headers=headers))
    assert (None if isinstance(d, Allow) else d.problem.log_reason) == expected
    if expected:
        assert d.problem.reason == "headers_too_large" and d.problem.status == 431


@pytest.mark.parametrize(
    "mode, size, refused, detected",
    [
        ("enforce", 1000, False, False),
        ("enforce", 1001, True, False),
        ("enforce", 99999999999999999999999, True, False),
        ("detect", 1000, False, False),
        ("detect", 1001, False, True),  # recorded as the filter's would-be deny; the request goes on
        ("off", 1001, False, False),
    ],
)
def test_body_limit_is_one_place_and_honours_the_mode(mode, size, refused, detected):
    limit = ingress.BodyLimit(ingress.IngressConfig(max_body_bytes=1000, mode=mode))
    ctx = _ctx(method="POST")
    problem = limit.check(ctx, size)
    assert (problem is not None) == refused
    if refused:
        assert problem.reason == "body_too_large" and problem.status == 413
    assert [(d.filter, d.reason) for d in ctx.detections] == (
        [("ingress", "body_too_large")] if detected else []
    )
    limit.check(ctx, size)  # a second look (the streamed total) does not record it twice
    assert len(ctx.detections) == (1 if detected else 0)
    # What the proxy caps a streamed body at: the limit only when enforced.
    assert limit.cap == 1000 if mode == "enforce" else limit.cap > 10**15


async def test_the_filter_leaves_the_body_size_to_the_body_limit():
    # A declared size over the limit passes the filter: the server asked BodyLimit before the
    # chain (so ingress.mode: detect forwards it instead of answering 413).
    f = _filter({"max_body_bytes": 1000})
    d = await f.check(_ctx(method="POST", headers=[("Host", "h"), ("Content-Length", "1001")]))
    assert isinstance(d, Allow)


SMUGGLING_CASES = [
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "te_and_cl"),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "0")], "te_and_cl"),
    ([("Content-Length", "5"), ("Content-Length", "6")], "conflicting_content_length"),
    ([("Content-Length", "5"), ("Content-Length", "5")], None),  # identical duplicates: one value
    ([("Content-Length", "+5")], "invalid_content_length"),
    ([("Content-Length", "0x5")], "invalid_content_length"),
    ([("Content-Length", "5, 5")], "invalid_content_length"),
    ([("Content-Length", "５")], "invalid_content_length"),  # fullwidth digit
    ([("Transfer-Encoding", "gzip, chunked")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "chunked, chunked")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "identity")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "xchunked")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "chunked;q=1")], "bad_transfer_encoding"),
    ([("Transfer-Encoding", "Chunked")], None),  # coding names are case-insensitive
    ([("Transfer-Encoding", " chunked ")], None),
]


async def test_transfer_encoding_in_http10_is_smuggling_and_closes_the_connection():
    # The filter reads the request line from the context (never aiohttp's request) and asks the
    # server, through the Deny, to close the connection after the answer.
    ctx = _ctx(method="POST", headers=[("Host", "h"), ("Transfer-Encoding", "chunked")])
    ctx.http_version = (1, 0)
    d = await _filter().check(ctx)
    assert isinstance(d, Deny) and d.problem.log_reason == "te_in_http10" and d.close
    assert d.problem.headers["Connection"] == "close"
    ctx.http_version = (1, 1)
    assert isinstance(await _filter().check(ctx), Allow)


@pytest.mark.parametrize("headers, expected", SMUGGLING_CASES)
async def test_request_smuggling_shapes(headers, expected):
    f = _filter()
    d = await f.check(_ctx(method="POST", headers=[("Host", "h")] + headers))
    assert (None if isinstance(d, Allow) else d.problem.log_reason) == expected
    if expected:
        assert d.problem.reason == "request_smuggling" and d.problem.status == 400


PATH_CASES = [
    # (route prefix, raw path, expected internal reason)
    ("/api/", "/api/x", None),
    ("/api/", "/api/a/b/c.json", None),
    ("/api/", "/api/a%20b", None),
    ("/api/", "/api/%C3%A6%C3%B8%C3%A5", None),  # æøå in UTF-8
    ("/api/", "/api/x/../y", None),  # dot-segments that stay inside the prefix
    ("/api/", "/api/./y", None),
    ("/api/", "/api/a%2Fb", None),  # encoded slash inside the prefix
    ("/api/", "/api/v1.2/x", None),
    ("/api/", "/api/..foo", None),  # not a dot-segment
    ("/api/", "/api/../admin", "path_escapes_prefix"),
    ("/api/", "/api/x/../../admin", "path_escapes_prefix"),
    ("/api/", "/api/..", "path_escapes_prefix"),
    ("/api/", "/api/%2e%2e/admin", "path_escapes_prefix"),
    ("/api/", "/api/%2E%2E/admin", "path_escapes_prefix"),
    ("/api/", "/api/.%2e/admin", "path_escapes_prefix"),
    ("/api/", "/api/..%2Fadmin", "path_escapes_prefix"),
    ("/api/", "/api/..%2fadmin", "path_escapes_prefix"),
    ("/api/", "/api%2F..%2Fadmin", "path_escapes_prefix"),
    ("/api/", "/api/..%5Cadmin", "path_escapes_prefix"),
    ("/api/", "/api/..\\admin", "path_escapes_prefix"),
    ("/api/", "/api\\..\\admin", "path_escapes_prefix"),
    ("/api", "/api/../apix", "path_escapes_prefix"),  # prefix without slash: /apix is outside
    ("/api", "/api/x/..", None),  # resolves to /api/
    ("/", "/../../etc/passwd", None),  # nothing to escape from the root route
    ("/api/", "/api/a%00b", "nul_in_path"),
    ("/api/", "/api/a\x00b", "nul_in_path"),
    ("/api/", "/api/%ff", "invalid_utf8"),
    ("/api/", "/api/%C3%28", "invalid_utf8"),
    ("/api/", "/api/%C0%AF", "invalid_utf8"),  # overlong '/'
    ("/api/", "/api/%ED%A0%80", "invalid_utf8"),  # UTF-16 surrogate
    ("/api/", "/api/%zz", "bad_percent_encoding"),
    ("/api/", "/api/%4", "bad_percent_encoding"),
]


@pytest.mark.parametrize("prefix, path, expected", PATH_CASES)
async def test_path_checks(prefix, path, expected):
    f = _filter(match={"path_prefix": prefix})
    d = await f.check(_ctx(raw_path=path))
    assert (None if isinstance(d, Allow) else d.problem.log_reason) == expected
    if expected:
        assert d.problem.reason == "bad_path" and d.problem.status == 400


@pytest.mark.parametrize("prefix, path, expected", PATH_CASES)
def test_check_path_function(prefix, path, expected):
    assert ingress.check_path(path, prefix) == expected


async def test_detect_mode_records_and_lets_through():
    cfg = _config({"mode": "detect", "deny_cidrs": ["127.0.0.0/8"]})
    stage = ingress.build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    filters = tuple(stage.filters_for_route(cfg.routes[0]))
    assert filters[0].mode is Mode.detect
    ctx = _ctx()
    assert await run_chain(filters, ctx) is None
    assert [(d.filter, d.reason) for d in ctx.detections] == [("ingress", "ip_in_deny_list")]


async def test_enforced_deny_through_the_runner():
    cfg = _config({"max_uri_bytes": 10})
    stage = ingress.build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    d = await run_chain(tuple(stage.filters_for_route(cfg.routes[0])), _ctx(raw_path="/api/0123456789"))
    assert d is not None and d.problem.reason == "uri_too_long"


def test_bad_cidr_is_a_config_error():
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config("server: {plain_http: true}\ningress: {deny_cidrs: ['10.0.0.0/33']}\n", "f.yaml")
    assert "f.yaml: ingress.deny_cidrs[0]: not a CIDR" in str(e.value)


def test_cidr_set_matches_ipaddress_membership():
    """The integer-range CidrSet answers exactly what ``ipaddress`` would (mapped IPv6 as IPv4)."""
    import random

    cidrs = [
        "10.0.0.0/8",
        "192.168.1.0/24",
        "203.0.113.7/32",
        "2001:db8::/32",
        "::1/128",
        "::ffff:100.64.0.0/106",
    ]
    nets = ingress.parse_networks(cidrs)
    cset = ingress.CidrSet(nets)
    rng = random.Random(1)
    samples = [
        ipaddress.ip_address(s)
        for s in (
            "10.255.255.255",
            "11.0.0.0",
            "203.0.113.7",
            "203.0.113.8",
            "::1",
            "::2",
            "2001:db8:ffff::1",
            "100.127.255.255",
            "100.128.0.0",
        )
    ]
    samples += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(300)]
    samples += [ipaddress.IPv4Address((10 << 24) | rng.getrandbits(24)) for _ in range(50)]
    samples += [ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(96)) for _ in range(50)]
    for ip in list(samples):
        if ip.version == 4:
            samples.append(ipaddress.IPv6Address((0xFFFF << 32) | int(ip)))  # mapped form
    for ip in samples:
        plain = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
        expected = any(plain.version == n.version and plain in n for n in nets)
        assert (ip in cset) is expected, ip
    assert not ingress.CidrSet(())


@pytest.mark.parametrize("value", ["a" * 40, "æ" * 40, "€" * 40, "\udcff" * 40, "x" * 10 + "😀" * 10])
@pytest.mark.parametrize("limit", [40, 60, 100, 150, 200, 400])
def test_headers_over_agrees_with_exact_byte_count(value, limit):
    headers = CIMultiDictProxy(CIMultiDict([("X-A", value), ("Host", "h")]))
    assert ingress.headers_over(headers, limit) is (ingress.header_bytes(headers) > limit)


@pytest.mark.parametrize(
    "allowed, route_methods, method, expect_allow",
    [
        (["GET", "POST"], None, "GET", None),
        (["GET", "POST"], None, "PUT", "GET, POST"),
        (["GET", "POST"], ["POST", "PUT"], "PUT", "POST"),  # both lists must admit the method
        (["GET", "POST"], ["POST", "PUT"], "POST", None),
    ],
)
async def test_global_method_allow_list_narrows_every_route(allowed, route_methods, method, expect_allow):
    match = {"path_prefix": "/api/"} | ({"methods": route_methods} if route_methods else {})
    d = await _filter({"allowed_methods": allowed}, match=match).check(_ctx(method=method))
    if expect_allow is None:
        assert isinstance(d, Allow)
    else:
        assert isinstance(d, Deny) and d.problem.reason == "method_not_allowed" and d.problem.status == 405
        assert d.problem.headers["Allow"] == expect_allow


def test_allowed_methods_must_be_known():
    with pytest.raises(Exception, match="unknown methods"):
        ingress.IngressConfig(allowed_methods=["GET", "CUST"])
