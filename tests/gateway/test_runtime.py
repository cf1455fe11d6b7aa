"""gateway/runtime.py: route compilation, the body-prefix hand-off, trusted proxies, draining."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from gateway import runtime
from gateway.chain import ALLOW, Filter, Stage
from gateway.config import parse_config
from gateway.pipeline import StageDecl


class Inspecting(Filter):
    name = "test_inspect"
    body_inspection_bytes = 131072

    async def check(self, ctx):
        return ALLOW


class Plain(Filter):
    name = "test_plain"

    async def check(self, ctx):
        return ALLOW


class FakeStage(Stage):
    name = "test_stage"

    def filters_for_route(self, route):
        return [Inspecting(), Plain()] if route.name == "inspected" else [Plain()]


def build_stage(env):
    return FakeStage()


CONFIG = """
server: {plain_http: true}
trusted_proxies: ["10.0.0.0/8", "::ffff:192.0.2.0/120"]
upstreams: {u: {url: "http://127.0.0.1:1"}}
ingress: {max_body_bytes: %d}
routes:
  - {name: inspected, match: {path_prefix: /a}, upstream: u}
  - {name: plain, match: {path_prefix: /b, hosts: [API.example]}, upstream: u}
"""


# The test's own pipeline: one stage, its two filters placed by the declaration.
TEST_PIPELINE = (StageDecl("test_stage", build_stage, positions={"test_plain": 10, "test_inspect": 30}),)


@pytest.fixture
def only_test_stage():
    return TEST_PIPELINE


@pytest.mark.parametrize(
    "max_body, inspected, plain",
    [
        (10 * 1024 * 1024, 131073, 65536),  # the WAF's wish (+1 to tell "longer"), else 64 KiB
        (1000, 1001, 1001),  # never more than one byte past the limit
    ],
)
def test_body_prefix_follows_the_filters_and_the_limit(only_test_stage, max_body, inspected, plain):
    rt = runtime.build_runtime(parse_config(CONFIG % max_body), pipeline=only_test_stage)
    by_name = {r.name: r for r in rt.routes}
    assert by_name["inspected"].body_prefix_bytes == inspected
    assert by_name["plain"].body_prefix_bytes == plain
    # Filters in the declared chain order, whatever order the stage gave them.
    assert [f.name for f in by_name["inspected"].filters] == ["test_plain", "test_inspect"]


def test_match_and_trust(only_test_stage):
    rt = runtime.build_runtime(parse_config(CONFIG % 1000), pipeline=only_test_stage)
    assert rt.match("whatever", "/a/x").name == "inspected"
    assert rt.match("api.example:8443", "/b/1").name == "plain"
    assert rt.match("other.example", "/b/1") is None
    assert rt.match("h", "/c") is None
    assert rt.is_trusted(ipaddress.ip_address("10.2.3.4"))
    assert not rt.is_trusted(ipaddress.ip_address("11.2.3.4"))
    assert "x-request-id" in rt.request_drop and "x-forwarded-for" in rt.request_drop


async def test_retire_waits_for_in_flight_requests(only_test_stage):
    rt = runtime.build_runtime(parse_config(CONFIG % 1000), pipeline=only_test_stage)
    await rt.start()
    rt.enter()
    closed = asyncio.ensure_future(rt.retire(5))
    await asyncio.sleep(0.05)
    assert not closed.done()
    rt.leave()
    await asyncio.wait_for(closed, 2)
    assert rt.upstreams.get("u").session is None


CASE_CONFIG = """
server: {plain_http: true}
upstreams: {u: {url: "http://127.0.0.1:1"}}
%s
routes:
  - {name: api, match: {path_prefix: /innsyn/api/}, upstream: u}
  - {name: innsyn, match: {path_prefix: /innsyn/}, upstream: u}
  - {name: bound, match: {path_prefix: /Admin, hosts: [api.example]}, upstream: u}
  - {name: public, match: {path_prefix: /}, upstream: u}
"""


def test_case_variants_of_route_prefixes(only_test_stage):
    """Red team F05: '/INNSYN/x' matched only the catch-all, which a case-insensitive upstream
    serves as '/innsyn/x'. case_variant names the route a case variant belongs to."""
    rt = runtime.build_runtime(parse_config(CASE_CONFIG % ""), pipeline=only_test_stage)
    assert not rt.prefixes_lower  # '/Admin': even lower-case paths are checked
    for path, route in (
        ("/INNSYN/x", "innsyn"),
        ("/Innsyn/api/x", "api"),
        ("/innsyn/API/x", "api"),
        ("/innsyn/%C3%B8/API/", None),
        ("/innsyn/x/API", None),
        ("/public/INNSYN/x", None),
        ("/innsyn/api/X", None),
        ("/INNSYNX/y", None),
        ("/innsyn", None),
        ("/INNSYN", None),
    ):
        got = rt.case_variant("h", path)
        assert (got.name if got else None) == route, path
        if route is not None:
            assert rt.match("h", path).name != route  # exact matching alone missed it
    assert rt.case_variant("api.example", "/admin/x").name == "bound"
    assert rt.case_variant("api.example", "/ADMIN").name == "bound"
    assert rt.case_variant("api.example:8443", "/Admin/x") is None  # exact match
    assert rt.case_variant("other.example", "/admin/x") is None  # route bound to another host
    off = runtime.build_runtime(
        parse_config(CASE_CONFIG % "http: {case_sensitive_upstream: true}"), pipeline=only_test_stage
    )
    assert off.case_guard == () and off.case_variant("h", "/INNSYN/x") is None


def test_each_builder_sees_only_its_declared_sections():
    """A stage's builder gets its own sections and the shared facts its declaration lists;
    reading another section fails loudly (also through getattr with a default)."""
    from gateway.chain import UndeclaredSection
    from gateway.pipeline import PIPELINE, StageDecl

    seen = {}

    def nosy(env):
        seen["own"] = env.config.ingress.max_body_bytes
        seen["path"] = env.config.resolve_path("x.pem")
        getattr(env.config, "issuers", None)  # not declared: must not read as "absent"
        return None

    cfg = parse_config(CONFIG % 1000)
    decl = StageDecl("nosy", nosy, sections=PIPELINE[0].sections)
    with pytest.raises(UndeclaredSection, match="'nosy' reads config section 'issuers'"):
        runtime.build_runtime(cfg, pipeline=(decl,))
    assert seen["own"] == 1000 and seen["path"].endswith("x.pem")
    # Declared as a shared fact, it is readable.
    ok = StageDecl("nosy", nosy, sections=PIPELINE[0].sections, reads=("issuers",))
    runtime.build_runtime(cfg, pipeline=(ok,))
