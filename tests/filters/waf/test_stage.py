"""The gateway filter on hand-built contexts: enforce/detect, audit, exclusions, body limit."""

import ipaddress

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from filters.waf import build_stage
from filters.waf.stage import MATCHES_HEADER, WafFilter
from gateway.chain import Allow, BuildEnv, Deny, Mode
from gateway.config import parse_config
from gateway.context import RequestContext
from gateway.pipeline import chain_positions
from gateway.problems import REASONS


def config(**waf):
    return parse_config(
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\n"
        "routes:\n"
        "  - {name: api, match: {path_prefix: /api}, upstream: u,\n"
        "     waf: {remove_rule_ids: [9103100], remove_targets: ['9105100:ARGS:comment']}}\n"
        "  - {name: web, upstream: u}\n"
        "server: {plain_http: true}\n"
    ).model_copy(
        update={"waf": parse_config("waf: {}\nserver: {plain_http: true}").waf.model_copy(update=waf)}
    )


def filt(route="web", **waf) -> WafFilter:
    cfg = config(**waf)
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    rc = next(r for r in cfg.routes if r.name == route)
    (f,) = stage.filters_for_route(rc)
    return f


def ctx(target="/", method="GET", headers=None, body=b"", complete=True):
    hdrs = CIMultiDict(headers or {"Host": "x", "User-Agent": "Mozilla/5.0", "Accept": "*/*"})
    req = make_mocked_request(method, target, headers=hdrs)
    path, _, qs = target.partition("?")
    return RequestContext(
        request_id="req-1",
        method=method,
        raw_path=path,
        path=path,
        query_string=qs,
        host="x",
        scheme="https",
        peer_ip=ipaddress.ip_address("127.0.0.1"),
        client_ip=ipaddress.ip_address("127.0.0.1"),
        headers=CIMultiDictProxy(hdrs),
        request=req,
        runtime=None,
        body=body,
        body_complete=complete,
        body_size_hint=len(body) if body else None,
    )


async def test_filter_contract():
    f = filt()
    assert f.name == "waf" and f.name in chain_positions() and f.mode is Mode.enforce
    assert f.body_inspection_bytes == 131072
    assert REASONS["waf_blocked"][0] == 403


async def test_enforce_denies_sqli_and_records_ids_not_in_body():
    f = filt()
    c = ctx("/search?q=1%27%20or%20%271%27=%271")
    d = await f.check(c)
    assert type(d) is Deny and d.problem.reason == "waf_blocked" and d.problem.status == 403
    assert c.waf.blocked and 9105100 in c.waf.matched_rule_ids
    assert c.audit["waf"]["matched"] == c.waf.matched_rule_ids
    assert b"9105100" not in d.problem.body("req-1")


async def test_clean_request_allowed():
    c = ctx("/api/items?page=2")
    assert type(await filt().check(c)) is Allow
    assert c.waf.matched_rule_ids == [] and not c.waf.blocked


async def test_detect_mode_records_and_exposes_header_when_asked():
    f = filt(mode=Mode.detect, expose_matches_header=True)
    c = ctx("/?f=../../etc/passwd")
    d = await f.check(c)
    assert type(d) is Deny  # the chain runner turns a detect-mode Deny into a detection
    assert not c.waf.blocked and {9103100, 9103110} <= set(c.waf.matched_rule_ids)
    assert c.response_headers[MATCHES_HEADER].split(",")[:2] == ["9103100", "9103110"]


async def test_route_exclusions_applied():
    api = filt("api")
    c = ctx("/api/x?f=../a")  # 9103100 removed on /api
    assert type(await api.check(c)) is Allow
    c = ctx("/api/x?comment=1%27%20or%20%271%27=%271")  # 9105100 ignores ARGS:comment on /api
    await api.check(c)
    assert 9105100 not in c.waf.matched_rule_ids
    c = ctx("/x?comment=1%27%20or%20%271%27=%271")
    await filt("web").check(c)
    assert 9105100 in c.waf.matched_rule_ids


async def test_json_body_inspected():
    body = b'{"user":{"name":"<script>alert(1)</script>"}}'
    c = ctx(
        "/api/x",
        "POST",
        {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body))},
        body,
    )
    assert type(await filt().check(c)) is Deny
    assert 9106100 in c.waf.matched_rule_ids


@pytest.mark.parametrize(
    "on_limit,expected", [("reject", "waf_body_limit"), ("inspect_partial", "waf_blocked")]
)
async def test_body_over_inspection_limit(on_limit, expected):
    f = filt(inspection_limit_bytes=64, on_inspection_limit=on_limit)
    body = b"q=1%27%20or%20%271%27=%271&pad=" + b"x" * 40  # attack within the first 64 bytes
    c = ctx(
        "/x",
        "POST",
        {"Host": "x", "Content-Type": "application/x-www-form-urlencoded"},
        body[:65],
        complete=False,
    )
    d = await f.check(c)
    assert type(d) is Deny and d.problem.reason == expected


async def test_crs_rules_from_config(tmp_path):
    from .conftest import crs_dir

    d = crs_dir()
    cfg = parse_config(
        f"upstreams: {{u: {{url: 'http://127.0.0.1:9'}}}}\nroutes: [{{name: r, upstream: u}}]\n"
        f"server: {{plain_http: true}}\nwaf: {{rules: crs, crs_path: '{d}', paranoia_level: 1}}\n"
    )
    stage = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    (f,) = stage.filters_for_route(cfg.routes[0])
    c = ctx("/?id=1%27%20or%20%271%27=%271")
    assert type(await f.check(c)) is Deny and 949110 in c.waf.matched_rule_ids
    assert stage.readiness() == {"rules": "ok"}


def test_off_mode_builds_nothing():
    cfg = config(mode=Mode.off)
    assert build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})) is None


@pytest.mark.parametrize("on_limit", ["reject", "inspect_partial"])
async def test_arguments_limit(on_limit):
    f = filt(max_args=5, on_inspection_limit=on_limit)
    body = b"&".join(b"a%d=x" % i for i in range(10)) + b"&q=%3Cscript%3Ealert(1)%3C/script%3E"
    c = ctx("/x", "POST", {"Host": "x", "Content-Type": "application/x-www-form-urlencoded"}, body)
    d = await f.check(c)
    if on_limit == "reject":  # before any rule runs, with its own reason
        assert type(d) is Deny and d.problem.reason == "waf_too_many_args" and d.problem.status == 400
        assert c.waf.matched_rule_ids == [] and c.audit["waf"]["reason"] == "too_many_args"
    else:  # the first five arguments are inspected; the attack in the eleventh is not seen
        assert type(d) is Allow and c.audit["waf"]["truncated"]


async def test_unparsable_json_body_inspected_raw_or_rejected():
    body = b'{"q": "<script>alert(1)</script>"'  # no closing brace: the JSON processor fails
    c = ctx("/x", "POST", {"Host": "x", "Content-Type": "application/json"}, body)
    d = await filt(on_unparsable_body="inspect_raw").check(c)
    assert type(d) is Deny and d.problem.reason == "waf_blocked"  # seen through the raw fallback
    c = ctx("/x", "POST", {"Host": "x", "Content-Type": "application/json"}, b'{"a": 1')
    assert type(await filt(on_unparsable_body="inspect_raw").check(c)) is Allow
    d = await filt().check(c)  # the default: refused before any rule runs
    assert type(d) is Deny and d.problem.reason == "waf_body_unparsable" and d.problem.status == 400
    assert c.waf.matched_rule_ids == []


@pytest.mark.e2e
def test_check_config_warns_about_partial_inspection(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "c.yaml"
    f.write_text(
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n"
        "server: {plain_http: true}\nwaf: {on_inspection_limit: inspect_partial}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(f)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("ok ("), out.stdout
    assert "waf.on_inspection_limit: warning: inspect_partial" in out.stdout


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "multipart/related"])
async def test_gateway_crs_reads_a_body_no_processor_names_as_urlencoded(content_type):
    """The gateway's CRS sets tx.enforce_bodyproc_urlencoded (as WafEngine.for_crs does): a body of
    a type no processor reads is inspected as URL-encoded text by the attack rules (CRS 901350),
    not only refused by the content-type policy (920420)."""
    from .conftest import crs_dir

    f = filt(rules="crs", crs_path=crs_dir())
    c = ctx(
        method="POST",
        headers={"Host": "x", "User-Agent": "Mozilla/5.0", "Accept": "*/*", "Content-Type": content_type},
        body=b"q=1' union select password from users --",
    )
    assert isinstance(await f.check(c), Deny)
    assert 942100 in c.waf.matched_rule_ids
