"""W3C trace context through the real gateway to a real upstream: continued from trusted peers,
a new trace for everyone else (forged or malformed headers never reach the upstream), the trace
id in the access log, the audit record and the JSON application log."""

from __future__ import annotations

import json
import re

from gateway.tracing import parse_traceparent, valid_tracestate
from tests.fixtures.gateway import basic_config

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{PARENT}-01"
_TP = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


async def get(gw, path: str, headers: dict) -> int:
    async with gw.session() as s:
        async with s.get(gw.url + path, headers=headers) as r:
            await r.read()
            return r.status


async def test_untrusted_client_gets_a_new_trace_and_its_headers_are_dropped(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    assert await get(gw, "/a", {"traceparent": TP, "tracestate": "evil=1"}) == 200
    h = upstream.requests[-1]["headers"]
    assert h.getall("traceparent") == [h["traceparent"]]  # exactly one, ours
    trace_id, span_id, flags = _TP.fullmatch(h["traceparent"]).groups()
    assert trace_id != TRACE and span_id != PARENT and flags == "01"
    assert "tracestate" not in h
    line = (await gw.access_lines(1, lambda a: a["path"] == "/a"))[-1]
    assert line["trace_id"] == trace_id


async def test_trusted_proxy_trace_is_continued_with_the_gateways_span(start_gateway, upstream, tmp_path):
    audit = {"path": str(tmp_path / "audit" / "audit.jsonl"), "key": "k" * 32}
    gw = await start_gateway(
        basic_config(
            upstream.url,
            trusted_proxies=["127.0.0.1/32"],
            audit=audit,
            logging={"format": "json", "access_log": "logging"},
        )
    )
    assert (
        await get(
            gw,
            "/b",
            {
                "traceparent": TP,
                "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
                "X-Request-Id": "req-trace-1",
            },
        )
        == 200
    )
    h = upstream.requests[-1]["headers"]
    trace_id, span_id, flags = _TP.fullmatch(h["traceparent"]).groups()
    assert trace_id == TRACE and flags == "01"
    assert span_id != PARENT  # the gateway is the upstream's parent now
    assert h["tracestate"] == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    # Malformed from a trusted peer: a new trace, nothing of it forwarded.
    for bad in (
        "00-" + "0" * 32 + "-" + PARENT + "-01",
        "ff-" + TRACE + "-" + PARENT + "-01",
        TP.upper(),
        "00-" + TRACE + "-" + PARENT + "-01-extra",
        "garbage",
    ):
        assert await get(gw, "/c", {"traceparent": bad, "tracestate": "a=b"}) == 200
        got = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1)
        assert got != TRACE and "tracestate" not in upstream.requests[-1]["headers"], bad
    docs = [json.loads(line) for line in gw.output().splitlines() if line.startswith("{")]
    access = [d for d in docs if d.get("request_id") == "req-trace-1" and "status" in d]
    assert access and access[0]["trace_id"] == TRACE
    gw.stop()
    records = [json.loads(line) for line in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("request_id") == "req-trace-1" and r.get("trace_id") == TRACE for r in records)


async def test_tracing_off_forwards_no_trace_context(start_gateway, upstream):
    gw = await start_gateway(
        basic_config(upstream.url, trusted_proxies=["127.0.0.1/32"], tracing={"propagate": False})
    )
    assert await get(gw, "/d", {"traceparent": TP}) == 200
    assert "traceparent" not in upstream.requests[-1]["headers"]


def test_traceparent_and_tracestate_parsing():
    assert parse_traceparent(TP) == (TRACE, PARENT, "01")
    assert parse_traceparent("01-" + TRACE + "-" + PARENT + "-01-future") == (TRACE, PARENT, "01")
    for bad in (
        None,
        "",
        TP + "-x",
        TP.upper(),
        "00-" + TRACE[:-1] + "-" + PARENT + "-01",
        "00-" + TRACE + "-" + "0" * 16 + "-01",
        "x" * 600,
    ):
        assert parse_traceparent(bad) is None, bad
    assert valid_tracestate("a=1, b@x=2") == "a=1,b@x=2"
    assert valid_tracestate("a=1,=2") is None and valid_tracestate("A=1") is None
    assert valid_tracestate(",".join(f"k{i}=v" for i in range(33))) is None
