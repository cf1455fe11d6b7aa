"""OpenTelemetry spans of a request, exported over OTLP/HTTP (``tracing.otlp``).

Imported only when ``tracing.otlp`` is set (``gateway.tracing.build_otel``): the SDK is an optional
extra. One ``Otel`` per runtime (its own ``TracerProvider``, never the global one) owns a bounded
batch processor: finished spans wait in a queue of ``queue_size`` and a thread exports them in
batches; a full queue or a failed export drops spans, counts them
(``portvakt_otel_spans_dropped_total``) and logs one line per minute at most. The request path
never waits for the collector.

Per recorded request (``RequestTrace``): a SERVER span (``GET /prefix/``, continuing the trusted
peer's trace under the rules of ``gateway.tracing.incoming``), an INTERNAL span per policy stage
(``stage tokens``: decision, reason id, mode), a CLIENT span for the upstream call whose span id
is the upstream's ``traceparent`` parent. Attributes are the route, method, status, decision and
reason ids, the upstream's configured host: never a path, query, header value or body byte of
the request (a path can carry a fødselsnummer; headers carry tokens and passwords).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    format_span_id,
    format_trace_id,
    set_span_in_context,
)
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
                self.cause = record.getMessage()[:300]
            except Exception:  # a malformed record must not break the exporter thread
                self.cause = str(record.msg)[:300]
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


class BoundedBatchProcessor(SpanProcessor):
    """Sampled finished spans into a bounded queue; one thread exports them in batches.

    ``on_end`` runs on the event loop: a length check and an append, never a wait. The SDK's
    ``BatchSpanProcessor`` drops silently when its queue is full; here every drop is counted."""

    def __init__(
        self, exporter: SpanExporter, *, queue_size: int, batch_size: int, interval: float, timeout: float
    ):
        self.exporter = exporter
        self.queue_size, self.batch_size, self.interval, self.timeout = (
            queue_size,
            batch_size,
            interval,
            timeout,
        )
        self.queue: collections.deque[ReadableSpan] = collections.deque()
        self.drops = _DropLog()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="portvakt-otlp-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or not ctx.trace_flags.sampled or self._stopping:
            return
        if len(self.queue) >= self.queue_size:
            self.drops.add("queue_full", 1)
            return
        self.queue.append(span)
        if len(self.queue) >= self.batch_size:
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
            batch = [q.popleft() for _ in range(min(self.batch_size, len(q)))]
            try:
                ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception as e:  # the exporter thread survives whatever the exporter raises
                self.drops.cause = f"{type(e).__name__}: {e}"[:300]
                ok = False
            if ok:
                tracing.SPANS_EXPORTED.inc(len(batch))
            else:
                self.drops.add("export_failed", len(batch))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        deadline = time.monotonic() + timeout_millis / 1000
        while self.queue and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.queue

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(self.timeout + 1.0)
        self.exporter.shutdown()


class Otel:
    """The runtime component (``rt.components["otel"]``): tracer, exporter, processor."""

    def __init__(self, config: Any, otlp: tracing.OtlpConfig, base_dir: str):
        self.config = config
        self.tracing = config.tracing
        ca = config.resolve_path(otlp.ca_file) if otlp.ca_file else None
        self.exporter = OTLPSpanExporter(
            endpoint=otlp.endpoint,
            certificate_file=ca,
            headers=dict(otlp.headers),
            timeout=otlp.timeout_seconds,
        )
        self.processor = BoundedBatchProcessor(
            self.exporter,
            queue_size=otlp.queue_size,
            batch_size=otlp.batch_size,
            interval=otlp.export_interval_seconds,
            timeout=otlp.timeout_seconds,
        )
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self.processor.drops)
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(otlp.sample_ratio)),
            resource=Resource.create({"service.name": otlp.service_name, "service.version": __version__}),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("portvakt", __version__)
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
        """Start the request's SERVER span and take its ids into ``ctx`` (trace id, span id,
        flags, tracestate). ``ctx.otel`` is set only when the span is recorded (sampled). Never
        raises: should the SDK fail, the request goes on with plain W3C ids and no spans."""
        try:
            self._begin(ctx, headers, trusted)
        except Exception:
            log.exception("starting the server span failed (request %s)", ctx.request_id)
            ctx.otel = None
            ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.tracestate = tracing.start(
                headers, trusted, self.tracing
            )

    def _begin(self, ctx: Any, headers: Any, trusted: bool) -> None:
        parent = tracing.incoming(headers, trusted, self.tracing)
        if parent is not None:
            trace_id, parent_id, flags, state = parent
            try:
                trace_state = TraceState.from_header([state]) if state else None
            except Exception:
                trace_state = None
            remote = SpanContext(
                int(trace_id, 16),
                int(parent_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(int(flags, 16) & 1),
                trace_state=trace_state,
            )
            otel_ctx = set_span_in_context(NonRecordingSpan(remote), Context())
        else:
            otel_ctx, state = Context(), None
        method = ctx.method if ctx.method in _METHODS else "_OTHER"
        span = self.tracer.start_span(
            method,
            context=otel_ctx,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.scheme": ctx.scheme,
                "portvakt.request_id": ctx.request_id,
            },
        )
        sc = span.get_span_context()
        ctx.trace_id = format_trace_id(sc.trace_id)
        ctx.span_id = format_span_id(sc.span_id)
        ctx.trace_flags = f"{int(sc.trace_flags):02x}"
        ctx.tracestate = state
        if span.is_recording():
            ctx.otel = RequestTrace(self, span, method)
        else:
            span.end()  # nothing recorded; its ids still tell the upstream the trace is not sampled

    async def close(self) -> None:
        """Export what is queued (bounded), then stop: when the runtime is retired or the gateway stops."""
        for name in _EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self.processor.drops)
        await asyncio.to_thread(self.provider.shutdown)


class RequestTrace:
    """The spans of one recorded request (``ctx.otel``)."""

    __slots__ = ("otel", "server", "method", "parent", "client")

    def __init__(self, otel: Otel, server: Any, method: str):
        self.otel, self.server, self.method = otel, server, method
        self.parent = set_span_in_context(server, Context())
        self.client: Any = None

    def stage_decision(self, f: Any, decision: Any, elapsed: float) -> None:
        """One policy stage ran (``gateway.chain.run_chain``): a span from its start to now with
        its decision (allow | skip | deny | detect) and reason id. Never raises into the chain."""
        try:
            end = time.time_ns()
            attrs: dict[str, Any] = {"portvakt.stage": f.name, "portvakt.mode": f.mode.value}
            status = 0
            if type(decision) is Deny:
                problem = decision.problem
                attrs["portvakt.decision"] = "detect" if f.mode is Mode.detect else "deny"
                attrs["portvakt.reason"] = problem.log_reason
                status = problem.status or 500
            else:
                attrs["portvakt.decision"] = "allow" if type(decision) is Allow else "skip"
            span = self.otel.tracer.start_span(
                "stage " + f.name,
                context=self.parent,
                kind=SpanKind.INTERNAL,
                attributes=attrs,
                start_time=end - int(elapsed * 1e9),
            )
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, attrs["portvakt.reason"]))
            span.end(end)
        except Exception:  # a span is never worth a request
            log.exception("stage span for %s failed", getattr(f, "name", "?"))

    def upstream(self, ctx: Any, upstream_name: str) -> None:
        """The upstream call starts: a CLIENT span, whose id the upstream gets as its parent
        (without it, the server span's id stays the parent). Never raises."""
        try:
            self._upstream(ctx, upstream_name)
        except Exception:
            log.exception("starting the client span failed (request %s)", ctx.request_id)

    def _upstream(self, ctx: Any, upstream_name: str) -> None:
        attrs = dict(self.otel.upstreams.get(upstream_name) or {"portvakt.upstream": upstream_name})
        attrs["http.request.method"] = self.method
        span = self.client = self.otel.tracer.start_span(
            self.method, context=self.parent, kind=SpanKind.CLIENT, attributes=attrs
        )
        ctx.span_id = format_span_id(span.get_span_context().span_id)

    def end(self, ctx: Any) -> None:
        """The request is answered (``Gateway._finish``): end the client span (if any) and the
        server span, with the outcome as attributes."""
        status = ctx.status
        route = ctx.route
        client = self.client
        if client is not None:
            if ctx.decision == "error":
                client.set_attribute("error.type", ctx.reason or "error")
                client.set_status(Status(StatusCode.ERROR, ctx.reason or "error"))
            elif status:
                client.set_attribute("http.response.status_code", status)
            client.end()
        server = self.server
        if route is not None:
            server.update_name(f"{self.method} {route.prefix}")
            server.set_attribute("http.route", route.prefix)
            server.set_attribute("portvakt.route", route.name)
        if status:
            server.set_attribute("http.response.status_code", status)
        server.set_attribute("portvakt.decision", ctx.decision)
        if ctx.reason:
            server.set_attribute("portvakt.reason", ctx.reason)
        if status >= 500:
            server.set_status(Status(StatusCode.ERROR, ctx.reason or str(status)))
        server.end()
