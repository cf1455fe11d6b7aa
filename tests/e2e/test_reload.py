"""Reload (SIGHUP and POST /-/reload) and graceful shutdown (SIGTERM)."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.fixtures.gateway import basic_config


def two_upstreams(a: str, b: str, target: str) -> dict:
    cfg = basic_config(a)
    cfg["upstreams"]["other"] = {"url": b, "connect_timeout_seconds": 2, "timeout_seconds": 5}
    cfg["routes"] = [{"name": "moved", "match": {"path_prefix": "/moved"}, "upstream": target}]
    return cfg


async def _second_upstream():
    from tests.fixtures.upstream import Upstream

    up = Upstream()
    await up.start()
    return up


async def test_sighup_swaps_the_route_for_the_next_request(start_gateway, upstream):
    other = await _second_upstream()
    try:
        gw = await start_gateway(two_upstreams(upstream.url, other.url, "demo"))
        async with gw.session() as s:
            async with s.get(gw.url + "/moved/1") as r:
                assert r.status == 200
            assert len(upstream.requests) == 1 and not other.requests
            gw.write_config(two_upstreams(upstream.url, other.url, "other"))
            assert await gw.reload() == "success"
            async with s.get(gw.url + "/moved/2") as r:  # same keep-alive connection
                assert r.status == 200
        assert [q["path"] for q in other.requests] == ["/moved/2"]
        assert len(upstream.requests) == 1
        assert await gw.metric("portvakt_config_reloads_total", {"result": "success"}) == 1
        assert await gw.metric("portvakt_config_last_reload_success_timestamp_seconds") > 0
    finally:
        await other.stop()


async def test_broken_config_keeps_the_old_runtime_and_counts_the_failure(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    gw.write_config("routes: [{name: x, upstream: nowhere, bogus: 1}]\nserver: {workers: 0}\n", raw=True)
    assert await gw.reload() == "failure"
    assert await gw.metric("portvakt_config_reloads_total", {"result": "failure"}) == 1
    out = gw.output()
    # The full error list is logged, each with its YAML path.
    assert "routes[0].bogus: unknown key" in out
    assert "server.workers" in out
    async with gw.session() as s:
        async with s.get(gw.url + "/still-served") as r:
            assert r.status == 200
    # Invalid YAML fails the same way.
    gw.write_config("routes: [unclosed\n", raw=True)
    assert await gw.reload() == "failure"
    assert await gw.metric("portvakt_config_reloads_total", {"result": "failure"}) == 2
    # POST /-/reload with a fixed file succeeds and says so.
    gw.write_config(basic_config(upstream.url))
    status, doc = await gw.admin_reload()
    assert status == 200 and doc["result"] == "success"
    gw.write_config("upstreams: {}\nroutes: [{name: a, upstream: b}]\n", raw=True)
    status, doc = await gw.admin_reload()
    assert status == 422 and doc["result"] == "failure"
    assert any("routes[0].upstream" in p for p in doc["problems"])
    # A file that validates but cannot be built (a missing JWKS file) names its YAML path too.
    cfg = basic_config(upstream.url)
    cfg["issuers"] = {
        "mp": {
            "kind": "maskinporten",
            "issuer": "https://mp.example/",
            "jwks_file": "missing-jwks.json",
            "audience": "a",
        }
    }
    gw.write_config(cfg)
    status, doc = await gw.admin_reload()
    assert status == 422 and doc["result"] == "failure"
    assert any(p.startswith(f"{gw.config_path}: issuers.mp.jwks_file: ") for p in doc["problems"]), doc[
        "problems"
    ]


async def test_in_flight_request_finishes_on_its_runtime_across_a_reload(start_gateway, upstream):
    other = await _second_upstream()
    try:
        gw = await start_gateway(two_upstreams(upstream.url, other.url, "demo"))
        upstream.delay = 1.0
        async with gw.session() as s:
            slow = asyncio.ensure_future(s.get(gw.url + "/moved/slow"))
            while not upstream.started:
                await asyncio.sleep(0.02)
            gw.write_config(two_upstreams(upstream.url, other.url, "other"))
            assert await gw.reload() == "success"
            r = await slow
            assert r.status == 200
            r.release()
        assert [q["path"] for q in upstream.requests] == ["/moved/slow"]
    finally:
        await other.stop()


async def test_sigterm_drains_in_flight_requests_then_exits_zero(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    upstream.delay = 1.0
    async with gw.session() as s:
        pending = asyncio.ensure_future(s.get(gw.url + "/draining"))
        while not upstream.started:
            await asyncio.sleep(0.02)
        rc_task = asyncio.ensure_future(gw.stop_async())
        r = await pending
        assert r.status == 200
        await r.read()
        assert await rc_task == 0
    # The listener is gone.
    async with gw.session() as s:
        try:
            async with s.get(gw.url + "/after"):
                raise AssertionError("still accepting after SIGTERM")
        except aiohttp.ClientConnectionError:
            pass


async def test_workers_share_the_port_and_a_crashed_worker_is_restarted(start_gateway, upstream):
    import os
    import signal

    gw = await start_gateway(basic_config(upstream.url), workers=2)

    async def workers() -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.admin_url + "/readyz") as r:
                return (await r.json())["workers"] if r.status == 200 else {}

    pids = {k: v["pid"] for k, v in (await workers()).items()}
    assert len(pids) == 2 and len(set(pids.values())) == 2

    async def burst(n: int) -> None:
        for _ in range(n):  # a new connection each time: the kernel spreads them over workers
            async with gw.session(connector_owner=True) as s:
                async with s.get(gw.url + "/w", headers={"Connection": "close"}) as r:
                    assert r.status == 200

    await burst(10)
    assert (
        await gw.metric(
            "portvakt_requests_total",
            {"route": "demo", "method": "GET", "status": "200", "decision": "allow"},
        )
        == 10
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family is exposed twice"
    assert "# TYPE portvakt_build_info gauge" in types and "# TYPE portvakt_workers gauge" in types

    os.kill(pids["0"], signal.SIGKILL)
    for _ in range(200):
        now = await workers()
        if now and now["0"]["pid"] not in (None, pids["0"]):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(gw.output())
    await burst(4)
    assert await gw.metric("portvakt_worker_restarts_total") == 1
    # The killed worker's counts (scraped above) stay in the sum: the counter does not fall.
    assert (
        await gw.metric(
            "portvakt_requests_total",
            {"route": "demo", "method": "GET", "status": "200", "decision": "allow"},
        )
        == 14
    )
    assert await gw.reload() == "success"
    assert await gw.stop_async() == 0
    for pid in [now["0"]["pid"], pids["1"]]:
        try:
            os.kill(pid, 0)
            raise AssertionError(f"worker {pid} still running")
        except ProcessLookupError:
            pass
