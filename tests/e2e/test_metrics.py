"""Admin listener: metrics exposition after traffic, health, readiness, JWKS; never on the public port."""

from __future__ import annotations

import aiohttp

from tests.fixtures.gateway import basic_config, parse_metrics


async def test_exposition_has_the_documented_series_after_traffic(shared):
    gw = shared.gw  # shared by many tests: compare before/after

    def value(samples, name, **labels):
        return samples.get((name, frozenset(labels.items())), 0.0)

    ok = dict(route="demo", method="GET", status="200", decision="allow")
    before = parse_metrics(await gw.metrics_text())
    async with gw.session() as s:
        for _ in range(3):
            async with s.get(gw.url + "/m") as r:
                assert r.status == 200
        async with s.delete(gw.url + "/m/x") as r:
            assert r.status == 200
        async with s.get(gw.url + "/down/elsewhere") as r:
            assert r.status == 502
    text = await gw.metrics_text()
    after = parse_metrics(text)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("portvakt_requests_total", **ok) == 3
    assert (
        delta("portvakt_requests_total", route="demo", method="DELETE", status="200", decision="allow") == 1
    )
    assert delta("portvakt_requests_total", route="down", method="GET", status="502", decision="error") == 1
    assert delta("portvakt_request_duration_seconds_count", route="demo") == 4
    assert delta("portvakt_request_duration_seconds_count", route="down") == 1
    assert delta("portvakt_upstream_duration_seconds_count", upstream="demo") == 4
    assert value(after, "portvakt_requests_in_flight") == 0
    assert delta("portvakt_filter_decisions_total", filter="ingress", decision="allow", reason="") == 5
    assert delta("portvakt_filter_duration_seconds_count", filter="ingress") == 5
    assert ("portvakt_build_info", frozenset({("version", __import__("gateway").__version__)})) in after
    assert value(after, "portvakt_config_last_reload_success_timestamp_seconds") > 0
    for series in (
        "# TYPE portvakt_config_reloads_total counter",
        "portvakt_upstream_duration_seconds_bucket",
        "portvakt_request_duration_seconds_bucket",
        "portvakt_filter_duration_seconds_bucket",
    ):
        assert series in text
    # Bounded labels: no path in the exposition.
    assert "/elsewhere" not in text and "/m/x" not in text


async def test_health_readiness_and_jwks(shared):
    gw = shared.gw
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(gw.admin_url + "/readyz") as r:
            assert r.status == 200
            doc = await r.json()
        assert (
            doc["status"] == "ready" and doc["config"] == "loaded" and isinstance(doc["dependencies"], dict)
        )
        async with s.get(gw.admin_url + "/.well-known/jwks.json") as r:
            assert r.status == 200
            jwks = await r.json()
        assert jwks["keys"] and all("d" not in k for k in jwks["keys"])
    # The admin endpoints are not served on the public port.
    async with gw.session() as s:
        async with s.get(gw.url + "/metrics") as r:  # proxied to the upstream like any path
            body = await r.text()
        assert "portvakt_requests_total" not in body


async def test_readyz_is_503_when_a_dependency_is_down(start_gateway, upstream):
    # A redis rate-limit backend that refuses connections reports "down" with on_backend_error: deny.
    cfg = basic_config(
        upstream.url, rate_limit={"backend": "redis://127.0.0.1:1", "on_backend_error": "deny"}
    )
    cfg["routes"][0]["rate_limits"] = [{"per": "route", "limit": 10, "period_seconds": 1}]
    gw = await start_gateway(cfg, wait_ready=False)
    import asyncio

    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(gw.admin_url + "/readyz") as r:
                    status, doc = r.status, await r.json()
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError(gw.output())
    assert status == 503, doc
    assert doc["status"] == "not ready"
    assert any(str(v).startswith("down") for v in doc["dependencies"].values())
