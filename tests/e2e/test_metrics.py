"""Admin listener: metrics exposition after traffic, health, readiness, JWKS; never on the public port."""

from __future__ import annotations

import aiohttp

from tests.fixtures.gateway import basic_config, parse_metrics


async def test_exposition_has_the_documented_series_after_traffic(start_gateway, upstream):
    cfg = basic_config(upstream.url)
    cfg["routes"][0]["match"] = {"path_prefix": "/m"}
    gw = await start_gateway(cfg)
    async with gw.session() as s:
        for _ in range(3):
            async with s.get(gw.url + "/m") as r:
                assert r.status == 200
        async with s.delete(gw.url + "/m/x", headers={"X-Test": "1"}) as r:
            assert r.status == 200
        async with s.get(gw.url + "/elsewhere") as r:
            assert r.status == 404
    text = await gw.metrics_text()
    samples = parse_metrics(text)

    def value(name, **labels):
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("portvakt_requests_total", route="demo", method="GET", status="200", decision="allow") == 3
    assert value("portvakt_requests_total", route="demo", method="DELETE", status="200", decision="allow") == 1
    assert value("portvakt_requests_total", route="(none)", method="GET", status="404", decision="deny") == 1
    assert value("portvakt_request_duration_seconds_count", route="demo") == 4
    assert value("portvakt_upstream_duration_seconds_count", upstream="demo") == 4
    assert value("portvakt_requests_in_flight") == 0
    assert value("portvakt_filter_decisions_total", filter="ingress", decision="allow", reason="") >= 3
    assert value("portvakt_filter_duration_seconds_count", filter="ingress") >= 4
    assert ("portvakt_build_info", frozenset({("version", __import__("gateway").__version__)})) in samples
    assert value("portvakt_config_last_reload_success_timestamp_seconds") > 0
    for series in ("portvakt_config_reloads_total", "portvakt_requests_total", "portvakt_upstream_duration_seconds_bucket"):
        assert series in text
    # Bounded labels: no path in the exposition.
    assert "/elsewhere" not in text and "/m/x" not in text


async def test_health_readiness_and_jwks(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(gw.admin_url + "/readyz") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["status"] == "ready" and doc["config"] == "loaded" and isinstance(doc["dependencies"], dict)
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
    cfg = basic_config(upstream.url, rate_limit={"backend": "redis://127.0.0.1:1", "on_backend_error": "deny"})
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
