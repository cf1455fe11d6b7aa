"""Hostile request shapes through the WAF filter (built-in pack and CRS): each gets its own
answer under the default limits, never a 5xx, and a shape over a limit runs no rule.

The CPU each shape costs is measured by bench/waf_hostile.py, not asserted here.
"""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from filters.waf import build_stage
from filters.waf.stage import WafFilter
from gateway.chain import Allow, BuildEnv, Deny
from gateway.config import parse_config
from gateway.context import RequestContext

from .conftest import crs_dir
from .hostile_shapes import Shape, shapes


def waf_filter(rules: str) -> WafFilter:
    extra = f", crs_path: '{crs_dir()}'" if rules == "crs" else ""
    cfg = parse_config(
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n"
        f"server: {{plain_http: true}}\nwaf: {{rules: {rules}{extra}}}\n"
    )
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    (f,) = stage.filters_for_route(cfg.routes[0])
    return f


_FILTERS: dict[str, WafFilter] = {}


def cached_filter(rules: str) -> WafFilter:
    if rules not in _FILTERS:
        _FILTERS[rules] = waf_filter(rules)
    return _FILTERS[rules]


def shape_ctx(shape: Shape) -> RequestContext:
    hdrs = CIMultiDict(shape.headers())
    req = make_mocked_request(shape.method, shape.target, headers=hdrs)
    path, _, qs = shape.target.partition("?")
    return RequestContext(
        request_id="hostile",
        method=shape.method,
        raw_path=path,
        path=path,
        query_string=qs,
        host="api.example.no",
        scheme="https",
        peer_ip=ipaddress.ip_address("192.0.2.7"),
        client_ip=ipaddress.ip_address("192.0.2.7"),
        headers=CIMultiDictProxy(hdrs),
        request=req,
        runtime=None,
        body=shape.body,
        body_complete=True,
        body_size_hint=len(shape.body) or None,
    )


@pytest.mark.parametrize("rules", ["builtin", pytest.param("crs", marks=pytest.mark.e2e)])
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: s.name)
async def test_hostile_shape_answer(rules, shape):
    f = cached_filter(rules)
    c = shape_ctx(shape)
    d = await f.check(c)
    if shape.expect == "inspected":
        assert type(d) is Allow or (type(d) is Deny and d.problem.reason == "waf_blocked"), d
        assert "reason" not in c.audit["waf"]
    else:
        assert type(d) is Deny, d
        assert d.problem.reason == shape.expect
        assert d.problem.status in (400, 413)
        assert c.waf is None or c.waf.matched_rule_ids == []  # refused before any rule ran


async def test_benign_xml_in_every_declared_encoding_is_allowed():
    f = cached_filter("builtin")
    for shape in shapes():
        if shape.name.startswith("xml declared"):
            assert type(await f.check(shape_ctx(shape))) is Allow, shape.name


async def test_attack_in_a_shift_jis_xml_body_is_seen():
    body = (
        '<?xml version="1.0" encoding="Shift_JIS"?><q>日本 &lt;script&gt;alert(1)&lt;/script&gt;</q>'.encode(
            "shift_jis"
        )
    )
    shape = Shape("sjis attack", "", body, "application/xml")
    d = await cached_filter("builtin").check(shape_ctx(shape))
    assert type(d) is Deny and d.problem.reason == "waf_blocked"


async def test_detect_mode_records_a_limit_and_lets_the_request_on():
    cfg = parse_config(
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n"
        "server: {plain_http: true}\nwaf: {mode: detect}\n"
    )
    (f,) = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})).filters_for_route(cfg.routes[0])
    c = shape_ctx(next(s for s in shapes() if s.name == "form 3000 args (over)"))
    d = await f.check(c)
    assert type(d) is Deny and d.problem.reason == "waf_too_many_args"  # the chain runner records it
    assert not c.waf.blocked


def test_inspect_partial_and_inspect_raw_are_warned():
    from filters.waf.stage import config_warnings

    cfg = parse_config(
        "waf: {on_inspection_limit: inspect_partial, on_unparsable_body: inspect_raw}\n"
        "server: {plain_http: true}"
    ).waf
    warnings = config_warnings(cfg)
    assert any("inspect_partial" in w for w in warnings) and any("inspect_raw" in w for w in warnings)
    assert config_warnings(parse_config("server: {plain_http: true}").waf) == []
