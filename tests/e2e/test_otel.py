"""OpenTelemetry spans from a real gateway process to a real OTLP/HTTP receiver (tracing.otlp):
span names and kinds, parent/child links, the trace id the upstream and the audit record see,
attributes free of secrets, sampling, a collector that is down or refusing, and the gateway
without the otel extra installed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys

import yaml

from tests.e2e.helpers_identity import (
    GRANTING_ORG,
    ORG_URL,
    PASSWORD,
    PERSON,
    PERSON_URL,
    bearer,
    call,
    creds,
    identity_config,
)
from tests.fixtures.gateway import ROOT, basic_config

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
_TP = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def otlp(endpoint: str, **kw) -> dict:
    return {"otlp": {"endpoint": endpoint, "export_interval_seconds": 0.2, **kw}}


def by_trace(spans: list[dict], trace_id: str) -> list[dict]:
    return [s for s in spans if s["trace_id"] == trace_id]


def complete(trace_id: str, n: int):
    return lambda spans: len(by_trace(spans, trace_id)) >= n


async def test_request_spans_reach_the_collector_linked_and_free_of_secrets(
    start_gateway, upstream, issuer, otlp_receiver, tmp_path
):
    rx = otlp_receiver
    audit_path = tmp_path / "audit" / "audit.jsonl"
    gw = await start_gateway(
        identity_config(
            upstream.url,
            issuer,
            trusted_proxies=["127.0.0.1/32"],
            audit={"path": str(audit_path), "key": "k" * 32},
            tracing=otlp(rx.url, headers={"X-Collector-Key": "collector-secret"}),
        )
    )
    token = issuer.mint(scope="ks:fiks")
    secret_headers = {**bearer(token), **creds(), "X-Fnr": PERSON, "Cookie": f"fnr={PERSON}"}
    url = gw.url + ORG_URL.format(org=GRANTING_ORG) + f"?fnr={PERSON}&passord={PASSWORD}"
    async with gw.session() as s:
        # 1. A trusted peer's trace is continued: the gateway's server span is its child.
        status, _, resp_headers = await call(
            s, url, {**secret_headers, "traceparent": f"00-{TRACE}-{PARENT}-01", "X-Request-Id": "otel-1"}
        )
        assert status == 200
        up_tp = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"])
        # 2. No traceparent: a new trace, rooted at the gateway.
        status, _, _ = await call(s, url, secret_headers)
        assert status == 200
        new_tp = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"])
        # 3. A wrong password: denied by the integrations stage, nothing upstream.
        status, _, _ = await call(s, url, {**secret_headers, **creds(password="feil-passord-123")})
        assert status == 401
        # 4. A fødselsnummer in the path.
        await call(s, gw.url + PERSON_URL.format(pid=PERSON), secret_headers)

    assert up_tp.group(1) == TRACE and up_tp.group(3) == "01"
    spans = await rx.wait_for(complete(TRACE, 3))
    spans = await rx.wait_for(complete(new_tp.group(1), 3))
    traced = by_trace(spans, TRACE)
    server = [s for s in traced if s["kind"] == "SERVER"]
    assert len(server) == 1
    server = server[0]
    assert server["name"] == "GET /innsyn/"
    assert server["parent_span_id"] == PARENT
    assert server["attributes"]["http.route"] == "/innsyn/"
    assert server["attributes"]["portvakt.route"] == "innsyn"
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["attributes"]["portvakt.decision"] == "allow"
    assert server["attributes"]["portvakt.request_id"] == "otel-1"
    assert server["resource"]["service.name"] == "portvakt"
    stages = [s for s in traced if s["kind"] == "INTERNAL"]
    assert {s["attributes"]["portvakt.stage"] for s in stages} >= {"tokens", "integrations", "authorize"}
    for st in stages:
        assert st["name"] == "stage " + st["attributes"]["portvakt.stage"]
        assert st["parent_span_id"] == server["span_id"]
        assert st["attributes"]["portvakt.decision"] in ("allow", "skip")
        assert server["start"] <= st["start"] <= st["end"] <= server["end"]
    client = [s for s in traced if s["kind"] == "CLIENT"]
    assert len(client) == 1
    assert client[0]["parent_span_id"] == server["span_id"]
    # The upstream's parent is the client span: its traceparent names that span.
    assert up_tp.group(2) == client[0]["span_id"]
    assert client[0]["attributes"]["server.address"] == "127.0.0.1"
    assert client[0]["attributes"]["portvakt.upstream"] == "demo"
    assert client[0]["attributes"]["http.response.status_code"] == 200

    fresh = by_trace(spans, new_tp.group(1))
    root = next(s for s in fresh if s["kind"] == "SERVER")
    assert root["parent_span_id"] == ""
    assert new_tp.group(2) == next(s for s in fresh if s["kind"] == "CLIENT")["span_id"]

    denied = await rx.wait_for(
        lambda spans: any(s["attributes"].get("portvakt.decision") == "deny" for s in spans)
    )
    deny_stage = next(
        s for s in denied if s["kind"] == "INTERNAL" and s["attributes"]["portvakt.decision"] == "deny"
    )
    assert deny_stage["attributes"]["portvakt.stage"] == "integrations"
    assert deny_stage["attributes"]["portvakt.reason"] == "integration_bad_password"
    deny_server = next(s for s in denied if s["span_id"] == deny_stage["parent_span_id"])
    assert deny_server["attributes"]["http.response.status_code"] == 401
    assert not any(s["kind"] == "CLIENT" and s["trace_id"] == deny_stage["trace_id"] for s in denied)

    # The person request's spans, too, before looking at every byte exported.
    await rx.wait_for(lambda spans: len({s["trace_id"] for s in spans}) >= 4)
    exported = b"".join(rx.raw)
    for secret in (token, token.split(".")[1], token.split(".")[2], PASSWORD, "feil-passord-123", PERSON):
        assert secret.encode() not in exported, secret
    assert b"collector-secret" not in exported
    assert all(r.get("x-collector-key") == "collector-secret" for r in rx.requests)
    assert "collector-secret" not in gw.output()

    # The audit record carries the same trace id.
    gw.stop()
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert any(r.get("request_id") == "otel-1" and r.get("trace_id") == TRACE for r in records)
    assert sum(1 for r in records if r.get("trace_id") == new_tp.group(1)) == 1


async def test_sampling_ratio_zero_records_only_traces_a_trusted_parent_sampled(
    start_gateway, upstream, otlp_receiver
):
    rx = otlp_receiver
    gw = await start_gateway(
        basic_config(upstream.url, trusted_proxies=["127.0.0.1/32"], tracing=otlp(rx.url, sample_ratio=0))
    )
    async with gw.session() as s:
        async with s.get(gw.url + "/new") as r:
            assert r.status == 200
        unsampled = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"])
        async with s.get(gw.url + "/parent-says-no", headers={"traceparent": f"00-{TRACE}-{PARENT}-00"}) as r:
            assert r.status == 200
        no = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"])
        other = "a" * 32
        async with s.get(
            gw.url + "/parent-says-yes", headers={"traceparent": f"00-{other}-{PARENT}-01"}
        ) as r:
            assert r.status == 200
    # The upstream is told: not sampled (bit 0; bit 1 is W3C level 2's "random trace id").
    assert int(unsampled.group(3), 16) & 1 == 0
    assert no.group(1) == TRACE and int(no.group(3), 16) & 1 == 0
    spans = await rx.wait_for(complete(other, 2))
    # Exports go in order: once the sampled trace arrived, nothing of the other two ever will.
    assert not by_trace(spans, unsampled.group(1)) and not by_trace(spans, TRACE)


async def test_an_untrusted_client_cannot_choose_the_trace_or_force_sampling(
    start_gateway, upstream, otlp_receiver
):
    rx = otlp_receiver
    # Nobody trusted, nothing sampled: a client's "sampled" traceparent must not make the gateway
    # record (and export) its requests, nor put its trace id or tracestate on them.
    gw = await start_gateway(basic_config(upstream.url, tracing=otlp(rx.url, sample_ratio=0)))
    async with gw.session() as s:
        for i in range(5):
            tp = f"00-{TRACE}-{PARENT}-01"
            async with s.get(gw.url + f"/u{i}", headers={"traceparent": tp, "tracestate": "evil=1"}) as r:
                assert r.status == 200
            h = upstream.requests[-1]["headers"]
            got = _TP.fullmatch(h["traceparent"])
            assert got.group(1) != TRACE and int(got.group(3), 16) & 1 == 0
            assert "tracestate" not in h
    # A second gateway on the same receiver records everything: once its spans are there, the
    # first one's would have been too (same receiver, same export interval).
    gw2 = await start_gateway(basic_config(upstream.url, tracing=otlp(rx.url)))
    async with gw2.session() as s:
        async with s.get(gw2.url + "/sampled", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}) as r:
            assert r.status == 200
    sampled = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1)
    assert sampled != TRACE  # untrusted there too: a new trace, rooted at the gateway
    spans = await rx.wait_for(complete(sampled, 2))
    await gw.stop_async()  # flushes whatever the first gateway had queued
    assert {s["trace_id"] for s in rx.spans} == {sampled}
    assert next(s for s in spans if s["kind"] == "SERVER")["parent_span_id"] == ""


async def test_reload_turns_export_on_and_moves_it_to_another_collector(
    start_gateway, upstream, otlp_receiver
):
    from tests.fixtures.otlp import OtlpReceiver

    gw = await start_gateway(basic_config(upstream.url))
    gw.write_config(basic_config(upstream.url, tracing=otlp(otlp_receiver.url)))
    assert await gw.reload() == "success"
    async with gw.session() as s:
        async with s.get(gw.url + "/on") as r:
            assert r.status == 200
    first = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1)
    await otlp_receiver.wait_for(complete(first, 2))
    other = await OtlpReceiver().start()
    try:
        gw.write_config(basic_config(upstream.url, tracing=otlp(other.url)))
        assert await gw.reload() == "success"
        async with gw.session() as s:
            async with s.get(gw.url + "/moved") as r:
                assert r.status == 200
        moved = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1)
        await other.wait_for(complete(moved, 2))
        assert not by_trace(otlp_receiver.spans, moved)
    finally:
        await other.stop()


async def test_a_collector_down_or_refusing_never_affects_requests(start_gateway, upstream, otlp_receiver):
    # A port bound but not listening: connections are refused, and no other free_port() gets it.
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{hold.getsockname()[1]}/v1/traces"
    try:
        await _collector_down(start_gateway, upstream, dead)
    finally:
        hold.close()
    await _collector_refusing(start_gateway, upstream, otlp_receiver)


async def _collector_down(start_gateway, upstream, dead: str) -> None:
    gw = await start_gateway(
        basic_config(upstream.url, tracing=otlp(dead, queue_size=12, batch_size=5, timeout_seconds=1))
    )
    async with gw.session() as s:
        for i in range(30):
            async with s.get(gw.url + f"/down/{i}") as r:
                assert r.status == 200
    assert len(upstream.requests) == 30
    dropped = "portvakt_otel_spans_dropped_total"
    assert await gw.metric(dropped, {"reason": "queue_full"}) > 0
    for _ in range(600):
        if await gw.metric(dropped, {"reason": "export_failed"}) > 0:
            break
        await asyncio.sleep(0.05)
    assert await gw.metric(dropped, {"reason": "export_failed"}) > 0, gw.output()[-3000:]
    assert await gw.metric("portvakt_otel_spans_exported_total") == 0
    lines = [line for line in gw.output().splitlines() if "OpenTelemetry spans dropped" in line]
    assert len(lines) == 1, lines  # once per interval, not once per span or batch
    assert "Failed to export" not in gw.output().replace(lines[0], "")  # the exporter's own lines folded in


async def _collector_refusing(start_gateway, upstream, rx) -> None:
    """A collector that answers 503: counted as export_failed; requests unaffected."""
    dropped = "portvakt_otel_spans_dropped_total"
    rx.status = 503
    gw2 = await start_gateway(basic_config(upstream.url, tracing=otlp(rx.url, timeout_seconds=1)))
    async with gw2.session() as s:
        async with s.get(gw2.url + "/refused") as r:
            assert r.status == 200
    await rx.wait_for(lambda spans: rx.refused > 0)
    for _ in range(600):
        if await gw2.metric(dropped, {"reason": "export_failed"}) > 0:
            break
        await asyncio.sleep(0.05)
    assert await gw2.metric(dropped, {"reason": "export_failed"}) > 0
    rx.status = 200  # the collector is back: the next spans arrive
    async with gw2.session() as s:
        async with s.get(gw2.url + "/back") as r:
            assert r.status == 200
    await rx.wait_for(lambda spans: len(spans) > 0)
    assert await gw2.metric("portvakt_otel_spans_exported_total") > 0


async def test_https_collector_is_verified_against_ca_file(start_gateway, upstream, pki):
    from tests.fixtures.otlp import OtlpReceiver

    rx = await OtlpReceiver().start(pki.server_ssl())
    try:
        # The dev CA is not among the system's: without ca_file nothing is exported (and counted).
        # (3 s: room for one retry, whose log line says why; the exporter's last line does not)
        gw = await start_gateway(basic_config(upstream.url, tracing=otlp(rx.url, timeout_seconds=3)))
        async with gw.session() as s:
            async with s.get(gw.url + "/untrusted-collector") as r:
                assert r.status == 200
        dropped = {"reason": "export_failed"}
        for _ in range(600):
            if await gw.metric("portvakt_otel_spans_dropped_total", dropped) > 0:
                break
            await asyncio.sleep(0.05)
        assert await gw.metric("portvakt_otel_spans_dropped_total", dropped) > 0
        assert not rx.spans
        assert "CERTIFICATE_VERIFY_FAILED" in gw.output()  # the dropped-spans line says why
        gw2 = await start_gateway(
            basic_config(upstream.url, tracing=otlp(rx.url, ca_file=pki.ca_cert, timeout_seconds=5))
        )
        async with gw2.session() as s:
            async with s.get(gw2.url + "/trusted-collector") as r:
                assert r.status == 200
        tid = _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1)
        await rx.wait_for(complete(tid, 2))
    finally:
        await rx.stop()


async def test_every_worker_exports_and_the_supervisor_sums_the_counts(
    start_gateway, upstream, otlp_receiver
):
    rx = otlp_receiver
    gw = await start_gateway(basic_config(upstream.url, tracing=otlp(rx.url)), workers=2)
    traces = set()
    for i in range(12):  # a new connection each: the kernel spreads them over the workers
        async with gw.session() as s:
            async with s.get(gw.url + f"/w{i}") as r:
                assert r.status == 200
        traces.add(_TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"]).group(1))
    await rx.wait_for(lambda spans: traces <= {s["trace_id"] for s in spans if s["kind"] == "SERVER"})
    exported = 0.0
    for _ in range(600):
        exported = await gw.metric("portvakt_otel_spans_exported_total")
        if exported >= len([s for s in rx.spans if s["trace_id"] in traces]):
            break
        await asyncio.sleep(0.1)
    assert exported >= len([s for s in rx.spans if s["trace_id"] in traces])


def _blocked_env(tmp_path) -> dict[str, str]:
    """PYTHONPATH with a sitecustomize that makes every ``import opentelemetry...`` fail, as on a
    machine without the otel extra."""
    block = tmp_path / "no-otel"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['opentelemetry'] = None\n")
    return {"PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}


async def test_without_the_extra_the_gateway_runs_and_otlp_is_a_config_error(
    start_gateway, upstream, tmp_path
):
    env = _blocked_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import opentelemetry"], env={**os.environ, **env}, capture_output=True
    )
    assert probe.returncode != 0  # the block works
    gw = await start_gateway(basic_config(upstream.url), env=env)
    async with gw.session() as s:
        async with s.get(gw.url + "/plain") as r:
            assert r.status == 200
    assert _TP.fullmatch(upstream.requests[-1]["headers"]["traceparent"])

    cfg_path = tmp_path / "otlp.yaml"
    cfg = basic_config(upstream.url, tracing=otlp("http://127.0.0.1:4318/v1/traces"))
    cfg["server"] = {"listen": "127.0.0.1:0", "plain_http": True}
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(cfg_path)],
        env={**os.environ, **env},
        cwd=str(ROOT),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "tracing.otlp" in text and "pip install 'portvakt[otel]'" in text, text
    assert "Traceback" not in text

    # A reload to that config is rejected; the running config keeps serving.
    gw.write_config(basic_config(upstream.url, tracing=otlp("http://127.0.0.1:4318/v1/traces")))
    assert await gw.reload() == "failure"
    async with gw.session() as s:
        async with s.get(gw.url + "/still") as r:
            assert r.status == 200
    assert "portvakt[otel]" in gw.output()


def test_otlp_config_is_checked(tmp_path):
    def check(tracing: dict) -> str:
        cfg = basic_config("http://127.0.0.1:9", tracing=tracing)
        cfg["server"] = {"listen": "127.0.0.1:0", "plain_http": True}
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(cfg))
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", str(p)],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
        )
        return out.stdout + out.stderr

    ok = "http://127.0.0.1:4318/v1/traces"
    assert "ok" in check(otlp(ok))
    for bad in (
        "ftp://x/v1/traces",
        "http://user:pw@collector/v1/traces",
        "http://c/v1/traces?k=v",
        "c:4318",
    ):
        text = check(otlp(bad))
        assert "tracing.otlp.endpoint" in text, (bad, text)
    assert "tracing.otlp.sample_ratio" in check(otlp(ok, sample_ratio=1.5))
    assert "tracing.otlp.queue_size" in check(otlp(ok, queue_size=0))
    assert "ok" in check({"propagate": False, **otlp(ok)})  # spans exported, no traceparent upstream
    assert "tracing.otlp.endpont" in check({"otlp": {"endpont": ok}})
