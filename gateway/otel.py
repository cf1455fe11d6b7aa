"""OpenTelemetry spans of a request, exported over OTLP/HTTP (``tracing.otlp``).

Imported only when ``tracing.otlp`` is set (``gateway.tracing.build_otel``): the SDK is an optional
extra. Per recorded request: a SERVER span (``GET /prefix/``), an INTERNAL span per policy stage
(``stage tokens``: decision, reason id, mode), a CLIENT span for the upstream call, whose span id
is the parent in the ``traceparent`` the upstream receives. The parent of the server span is a
trusted peer's ``traceparent`` (``gateway.tracing.incoming``), else the gateway starts the trace.
Attributes are the route, method, status, decision and reason ids, the request id and the
upstream's configured host: never a path, query, header value or body byte of the request (a
path can carry a fødselsnummer; headers carry tokens and passwords).

Cost. The SDK's tracer costs ~40 µs per span (sampler, locks, attribute copies) measured on this
project's machine: five spans would be ~200 µs of the event loop per request. So the request path
only records: ids (as ``gateway.tracing`` makes them), a sampling decision (``ParentBased`` over
``TraceIdRatioBased``, the SDK's rule: the trace id's low 64 bits under ``sample_ratio`` × 2^64),
one tuple per stage, a few timestamps. The export thread turns each finished request into SDK
``ReadableSpan`` objects and hands batches to the OTLP/HTTP exporter.

Export: a bounded queue (``queue_size`` spans) and one thread per runtime. A full queue or a
failed export drops spans, counts them (``portvakt_otel_spans_dropped_total``) and logs one line
per minute at most. The request path never waits for the collector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from yarl import URL

from gateway import __version__, tracing
from gateway.chain import Allow, Deny, Mode
from gateway.configbase import HTTP_METHODS

log = logging.getLogger("portvakt.otel")

LOG_INTERVAL = 60.0  # seconds between two "spans dropped" log lines
_METHODS = frozenset(HTTP_METHODS)
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.exporter.http.transport",
)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_getrandbits = random.getrandbits
_time_ns = time.time_ns


class _DropLog:
    """Spans dropped since the last log line, and why; one WARNING per ``LOG_INTERVAL`` at most.

    Also a logging filter for the exporter's own loggers: their per-failure lines (one per failed
    batch, each retry) are kept back and their last message becomes this line's cause."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.cause = ""
        self.last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            try:
                msg = record.getMessage()[:300]
            except Exception:  # a malformed record must not break the exporter thread
                msg = str(record.msg)[:300]
            # "Failed to export ... max retries" follows the line that says why: keep the why.
            if not (msg.startswith("Failed to export") and self.cause):
                self.cause = msg
        return False

    def add(self, reason: str, n: int) -> None:
        tracing.SPANS_DROPPED.labels(reason).inc(n)
        with self.lock:
            self.dropped[reason] += n
            now = time.monotonic()
            if now - self.last < LOG_INTERVAL:
                return
            self.last = now
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
            self.dropped.clear()
            cause = self.cause
        log.warning(
            "OpenTelemetry spans dropped since the last report: %s%s",
            counts,
            f" (last exporter message: {cause})" if cause else "",
        )


class Exporter:
    """Finished requests (``RequestTrace``) into a bounded queue; one thread makes their spans and
    exports them in batches of about ``batch_size`` spans.

    ``submit`` runs on the event loop: a count check and an append, never a wait. Every span that
    does not reach the collector is counted (the SDK's ``BatchSpanProcessor`` drops silently when
    its queue is full)."""

    def __init__(
        self,
        exporter: SpanExporter,
        resource: Resource,
        *,
        queue_size: int,
        batch_size: int,
        interval: float,
        timeout: float,
    ):
        self.exporter, self.resource = exporter, resource
        self.scope = InstrumentationScope("portvakt", __version__)
        self.queue_size, self.batch_size, self.interval, self.timeout = (
            queue_size,
            batch_size,
            interval,
            timeout,
        )
        self.queue: collections.deque[RequestTrace] = collections.deque()
        self.queued = 0  # spans in the queue (+= on the loop, -= in the thread: under the GIL)
        self.drops = _DropLog()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="portvakt-otlp-export", daemon=True)
        self._thread.start()

    def submit(self, trace: RequestTrace) -> None:
        n = trace.span_count()
        if self._stopping:
            return
        with self._lock:
            if self.queued + n > self.queue_size:
                full = True
            else:
                full = False
                self.queued += n
                self.queue.append(trace)
        if full:
            self.drops.add("queue_full", n)
        elif self.queued >= self.batch_size:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        q = self.queue
        while q:
            batch: list[ReadableSpan] = []
            while q and len(batch) < self.batch_size:
                with self._lock:
                    trace = q.popleft()
                    n = trace.span_count()
                    self.queued -= n
                try:
                    batch.extend(trace.spans(self.resource, self.scope))
                except Exception as e:  # a request whose spans cannot be made is dropped, counted
                    self.drops.cause = f"making spans: {type(e).__name__}: {e}"[:300]
                    self.drops.add("export_failed", n)
            if not batch:
                continue
            try:
                ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception as e:  # the exporter thread survives whatever the exporter raises
                self.drops.cause = f"{type(e).__name__}: {e}"[:300]
                ok = False
            if ok:
                tracing.SPANS_EXPORTED.inc(len(batch))
            else:
                self.drops.add("export_failed", len(batch))

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(self.timeout + 1.0)
        self.exporter.shutdown()


class _CaFileSession(requests.Session):
    """A requests session whose ``verify`` (the exporter sets ``ca_file`` there) is not replaced
    by ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment: requests lets those win
    over a session's CA bundle, so ``ca_file`` would be ignored wherever they are set."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings


class Otel:
    """The runtime component (``rt.components["otel"]``): sampling, the exporter and its thread."""

    def __init__(self, config: Any, otlp: tracing.OtlpConfig, base_dir: str):
        self.tracing = config.tracing
        # The SDK's TraceIdRatioBased rule: sampled when the trace id's low 64 bits are below this.
        self.bound = round(otlp.sample_ratio * (1 << 64))
        ca = config.resolve_path(otlp.ca_file) if otlp.ca_file else None
        exporter = OTLPSpanExporter(
            endpoint=otlp.endpoint,
            certificate_file=ca,
            headers=dict(otlp.headers),
            timeout=otlp.timeout_seconds,
            session=_CaFileSession() if ca else None,
        )
        self.exporter = Exporter(
            exporter,
            Resource.create({"service.name": otlp.service_name, "service.version": __version__}),
            queue_size=otlp.queue_size,
            batch_size=otlp.batch_size,
            interval=otlp.export_interval_seconds,
            timeout=otlp.timeout_seconds,
        )
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self.exporter.drops)
        # The upstream's configured host and port (never a request's URL): client span attributes.
        self.upstreams: dict[str, dict[str, Any]] = {}
        for name, up in config.upstreams.items():
            u = URL(up.url)
            self.upstreams[name] = {
                "server.address": u.host or "",
                "server.port": u.port or 0,
                "portvakt.upstream": name,
            }

    def begin(self, ctx: Any, headers: Any, trusted: bool) -> None:
        """The request's trace: ids into ``ctx`` (as ``gateway.tracing.start`` makes them) and the
        sampling decision in the flags; ``ctx.otel`` is set only when the request is sampled."""
        parent = tracing.incoming(headers, trusted, self.tracing)
        span_id = tracing.new_span_id()
        if parent is not None:
            trace_id, parent_id, flags, state = parent
            sampled = bool(int(flags, 16) & 1)
        else:
            trace_id, parent_id, state = tracing.new_trace_id(), None, None
            sampled = int(trace_id[16:], 16) < self.bound
        ctx.trace_id, ctx.span_id, ctx.tracestate = trace_id, span_id, state
        ctx.trace_flags = "01" if sampled else "00"
        if sampled:
            ctx.otel = RequestTrace(self, ctx, parent_id)

    async def close(self) -> None:
        """Export what is queued (bounded), then stop: when the runtime is retired or the gateway stops."""
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self.exporter.drops)
        await asyncio.to_thread(self.exporter.shutdown)


class RequestTrace:
    """What one sampled request's spans are made of (``ctx.otel``). The request path only
    records; ``spans`` (in the export thread) builds the ``ReadableSpan`` objects."""

    __slots__ = (
        "otel",
        "trace_id",
        "span_id",
        "parent_id",
        "tracestate",
        "method",
        "request_id",
        "scheme",
        "start",
        "stages",
        "client",
        "outcome",
    )

    def __init__(self, otel: Otel, ctx: Any, parent_id: str | None):
        self.otel = otel
        self.trace_id, self.span_id, self.parent_id = ctx.trace_id, ctx.span_id, parent_id
        self.tracestate = ctx.tracestate
        self.method = ctx.method if ctx.method in _METHODS else "_OTHER"
        self.request_id, self.scheme = ctx.request_id, ctx.scheme
        self.start = int(ctx.started_wall * 1e9)
        self.stages: list[tuple[Any, ...]] = []
        self.client: list[Any] | None = None  # [span id, upstream name, start ns]
        self.outcome: tuple[Any, ...] = ()

    def stage_decision(self, f: Any, decision: Any, elapsed: float) -> None:
        """One policy stage ran (``gateway.chain.run_chain``)."""
        self.stages.append((f, decision, _time_ns(), elapsed))

    def upstream(self, ctx: Any, upstream_name: str) -> None:
        """The upstream call starts: its span id is the upstream's parent."""
        span_id = tracing.new_span_id()
        self.client = [span_id, upstream_name, _time_ns()]
        ctx.span_id = span_id

    def end(self, ctx: Any) -> None:
        """The request is answered (``Gateway._finish``): queue it for export."""
        route = ctx.route
        self.outcome = (
            _time_ns(),
            ctx.status,
            ctx.decision,
            ctx.reason,
            route.prefix if route is not None else None,
            route.name if route is not None else None,
        )
        self.otel.exporter.submit(self)

    def span_count(self) -> int:
        return 1 + len(self.stages) + (self.client is not None)

    def spans(self, resource: Resource, scope: InstrumentationScope) -> list[ReadableSpan]:
        """The request's spans (in the export thread)."""
        trace_id = int(self.trace_id, 16)
        server_ctx = SpanContext(trace_id, int(self.span_id, 16), False, _SAMPLED)
        state = None
        if self.tracestate:
            try:
                state = TraceState.from_header([self.tracestate])
            except Exception:
                state = None
        parent = (
            SpanContext(trace_id, int(self.parent_id, 16), True, _SAMPLED, state)
            if self.parent_id is not None
            else None
        )
        end, status, decision, reason, prefix, route_name = self.outcome
        attrs: dict[str, Any] = {
            "http.request.method": self.method,
            "url.scheme": self.scheme,
            "portvakt.request_id": self.request_id,
            "portvakt.decision": decision,
        }
        name = self.method
        if prefix is not None:
            name = f"{self.method} {prefix}"
            attrs["http.route"] = prefix
            attrs["portvakt.route"] = route_name
        if status:
            attrs["http.response.status_code"] = status
        if reason:
            attrs["portvakt.reason"] = reason
        out = [
            ReadableSpan(
                name=name,
                context=server_ctx,
                parent=parent,
                resource=resource,
                attributes=attrs,
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR, reason or str(status)) if status >= 500 else _UNSET,
                start_time=self.start,
                end_time=end,
                instrumentation_scope=scope,
            )
        ]
        for f, d, stage_end, elapsed in self.stages:
            sattrs: dict[str, Any] = {"portvakt.stage": f.name, "portvakt.mode": f.mode.value}
            sstatus = _UNSET
            if type(d) is Deny:
                sattrs["portvakt.decision"] = "detect" if f.mode is Mode.detect else "deny"
                sattrs["portvakt.reason"] = d.problem.log_reason
                if (d.problem.status or 500) >= 500:
                    sstatus = Status(StatusCode.ERROR, d.problem.log_reason)
            else:
                sattrs["portvakt.decision"] = "allow" if type(d) is Allow else "skip"
            out.append(
                ReadableSpan(
                    name="stage " + f.name,
                    context=SpanContext(trace_id, _getrandbits(64) or 1, False, _SAMPLED),
                    parent=server_ctx,
                    resource=resource,
                    attributes=sattrs,
                    kind=SpanKind.INTERNAL,
                    status=sstatus,
                    start_time=stage_end - int(elapsed * 1e9),
                    end_time=stage_end,
                    instrumentation_scope=scope,
                )
            )
        if self.client is not None:
            span_id, upstream_name, start = self.client
            cattrs = dict(self.otel.upstreams.get(upstream_name) or {"portvakt.upstream": upstream_name})
            cattrs["http.request.method"] = self.method
            cstatus = _UNSET
            if decision == "error":
                cattrs["error.type"] = reason or "error"
                cstatus = Status(StatusCode.ERROR, reason or "error")
            elif status:
                cattrs["http.response.status_code"] = status
            out.append(
                ReadableSpan(
                    name=self.method,
                    context=SpanContext(trace_id, int(span_id, 16), False, _SAMPLED),
                    parent=server_ctx,
                    resource=resource,
                    attributes=cattrs,
                    kind=SpanKind.CLIENT,
                    status=cstatus,
                    start_time=start,
                    end_time=end,
                    instrumentation_scope=scope,
                )
            )
        return out
