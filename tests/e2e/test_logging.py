"""logging.format json|text from outside: every line of the process's output parsed, the request
id on the events of a request, the access log through the logging machinery or off."""

from __future__ import annotations

import json
import re

from tests.fixtures.gateway import basic_config
from tests.fixtures.upstream import free_port


def dead_upstream_config(logging_section: dict) -> dict:
    cfg = basic_config(f"http://127.0.0.1:{free_port()}", logging=logging_section)
    return cfg


async def test_json_logs_every_line_parses_and_events_carry_the_request_id(start_gateway):
    gw = await start_gateway(dead_upstream_config({"format": "json", "access_log": "logging"}))
    async with gw.session() as s:
        async with s.get(gw.url + "/case/1?x=1") as r:
            assert r.status == 502
            rid = r.headers["X-Request-Id"]
    gw.write_config("routes: [{name: a, upstream: nowhere}]\nserver: {workers: 0}\n", raw=True)
    assert await gw.reload() == "failure"
    lines = [line for line in gw.output().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    app = [d for d in docs if "logger" in d]
    access = [d for d in docs if "logger" not in d]
    assert all({"time", "level", "logger", "message"} <= set(d) for d in app)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["time"]) for d in app)
    upstream_events = [d for d in app if d["logger"] == "portvakt.proxy" and "unavailable" in d["message"]]
    assert upstream_events and upstream_events[0]["request_id"] == rid, app
    [line] = [d for d in access if d.get("request_id") == rid]
    assert line["status"] == 502 and line["path"] == "/case/1" and line["route"] == "demo"
    # Events outside a request have no request id; a reload failure is one event per problem.
    assert not any("request_id" in d for d in app if d["message"].startswith("portvakt ready"))
    assert len([d for d in app if d["message"].startswith("config reload problem: ")]) >= 3


async def test_text_logs_one_line_per_event_and_access_log_off(start_gateway):
    gw = await start_gateway(dead_upstream_config({"format": "text", "access_log": "off"}))
    async with gw.session() as s:
        async with s.get(gw.url + "/x") as r:
            rid = r.headers["X-Request-Id"]
    lines = [line for line in gw.output().splitlines() if line.strip()]
    assert gw.access_log() == []
    pattern = re.compile(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
    )
    assert all(pattern.match(line) for line in lines), lines
    assert any(f"[{rid}] upstream demo unavailable" in line for line in lines), lines


def test_formatters_keep_an_exception_on_one_line():
    import logging

    from gateway.logsetup import REQUEST_ID, JsonFormatter, TextFormatter, _RequestIdFilter

    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        rec = logging.LogRecord(
            "portvakt.test", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info()
        )
    token = REQUEST_ID.set("rid-123")
    try:
        _RequestIdFilter().filter(rec)
    finally:
        REQUEST_ID.reset(token)
    text = TextFormatter().format(rec)
    assert "\n" not in text and "[rid-123] failed: a\\nb" in text and "ValueError: boom\\nsecond line" in text
    doc = json.loads(JsonFormatter().format(rec))
    assert "\n" not in JsonFormatter().format(rec)
    assert (
        doc["request_id"] == "rid-123"
        and doc["message"] == "failed: a\nb"
        and "ValueError" in doc["exception"]
    )
