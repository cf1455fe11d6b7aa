"""/metrics as an operator's Prometheus sees it: process series, no _created series, known label
values from the start, the last reload's outcome as a gauge."""

from __future__ import annotations

from tests.fixtures.gateway import basic_config, parse_metrics


async def test_process_series_no_created_and_series_present_before_first_use(start_gateway, upstream):
    cfg = basic_config(upstream.url)
    cfg["routes"].insert(0, {"name": "cases", "match": {"path_prefix": "/cases/"}, "upstream": "demo"})
    gw = await start_gateway(cfg)
    text = await gw.metrics_text()
    assert "_created" not in text
    samples = parse_metrics(text)
    names = {n for n, _ in samples}
    for n in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert n in names, n
    # Known label values before any request or reload.
    for route in ("cases", "demo"):
        assert samples[("portvakt_request_duration_seconds_count", frozenset({("route", route)}))] == 0
    assert samples[("portvakt_upstream_duration_seconds_count", frozenset({("upstream", "demo")}))] == 0
    for result in ("success", "failure"):
        assert samples[("portvakt_config_reloads_total", frozenset({("result", result)}))] == 0
    assert samples[("portvakt_config_last_reload_successful", frozenset())] == 1


async def test_last_reload_successful_follows_the_last_reload(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    gw.write_config("routes: [{name: x, upstream: nowhere}]\n", raw=True)
    assert await gw.reload() == "failure"
    assert await gw.metric("portvakt_config_last_reload_successful") == 0
    ts_before = await gw.metric("portvakt_config_last_reload_success_timestamp_seconds")
    cfg = basic_config(upstream.url)
    cfg["routes"].append({"name": "later", "match": {"path_prefix": "/later/"}, "upstream": "demo"})
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    assert await gw.metric("portvakt_config_last_reload_successful") == 1
    assert await gw.metric("portvakt_config_last_reload_success_timestamp_seconds") >= ts_before
    # The route added by the reload has its series at once.
    text = await gw.metrics_text()
    assert 'portvakt_request_duration_seconds_count{route="later"} 0.0' in text


async def test_under_workers_the_supervisor_exposes_process_series(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url), workers=2, wait_ready=False)
    await gw.wait_ready(timeout=120)  # supervisor + 2 workers: slow on a loaded machine
    text = await gw.metrics_text()
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text
    assert parse_metrics(text)[("portvakt_config_last_reload_successful", frozenset())] == 1
