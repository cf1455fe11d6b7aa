"""The per-request path of the public listener (``RequestPath``, the request half of
``gateway.server.Gateway``).

Per request (``handle``): read the runtime once, resolve request id and client IP, build the
``RequestContext``, refuse what a reverse proxy must never do (CONNECT, absolute-form targets
for another host), match a route (404 ``no_route``), read the body prefix the route needs (the
WAF inspects it; an oversize body is refused before the upstream is contacted), run the chain,
ask the audit sink (strict durability) and forward. Every request, whatever its outcome, ends in
``_finish``: metrics, one access-log line and exactly one ``audit.record(ctx)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from filters.ingress import REQUEST_SMUGGLING
from gateway import accesslog, logsetup, metrics, problems, tlsutil, tracing
from gateway.canonical import (
    HOST_NOT_CANONICAL,
    PATH_NOT_CANONICAL,
    NotCanonical,
    Redirect,
    canonical_host,
    canonical_path,
)
from gateway.chain import run_chain
from gateway.config import HTTP_METHODS
from gateway.context import RequestContext
from gateway.edge import REQUEST_TIMEOUT, EdgeLimits
from gateway.framing import ChunkSizeOutOfRange
from gateway.listener import classify_parser_error
from gateway.norid import mask_person_numbers
from gateway.problems import BAD_REQUEST, NOT_FOUND, Problem
from gateway.proxy import BodyTooLarge, ClientBodyError, UpstreamError, forward
from gateway.requestfacts import new_request_id, parse_ip, resolve_client
from gateway.runtime import Runtime

log = logging.getLogger("portvakt.server")
_set_log_request_id = logsetup.REQUEST_ID.set
_set_log_trace_id = logsetup.TRACE_ID.set


def _logged_method(method: str) -> str:
    """An unknown method token goes to the access log and the audit record as sent: a person
    number in it (a client's mistake, or planted) is masked as one in the path is."""
    return method if method.isalpha() else mask_person_numbers(method)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_METHOD_LABELS = frozenset(HTTP_METHODS)
_NO_ROUTE = "(none)"
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
# The method of a request line the parser refused, as aiohttp quotes it: "b'CUST / HTTP/1.1'"
_METHOD_TOKEN = re.compile(r"b'([!#$%&*+.^_`|~0-9A-Za-z-]{1,20}) ")


HTTP_VERSION_NOT_SUPPORTED = problems.register(
    "http_version_not_supported", 505, "HTTP version not supported"
)
INVALID_HEADER_VALUE = problems.register("invalid_header_value", 400, "Header value is not valid UTF-8")
_HTTP_VERSIONS = ((1, 1), (1, 0))


def _last_value(headers: Any, name: str) -> str | None:
    """The last element of a (possibly repeated, comma-separated) header: the one the nearest
    trusted proxy wrote."""
    values = headers.getall(name, ())
    if not values:
        return None
    return values[-1].rsplit(",", 1)[-1].strip() or None


def forwarded_view(request: web.BaseRequest, ctx: RequestContext) -> None:
    """``ctx.forwarded_host`` / ``ctx.forwarded_port`` for the upstream: a trusted proxy's values
    when it sent valid ones, else the gateway's own (canonical Host, listening port)."""
    headers = ctx.headers
    if ctx.from_trusted_proxy:
        fh = _last_value(headers, "X-Forwarded-Host")
        if fh is not None:
            try:
                ctx.forwarded_host = canonical_host(fh, ctx.scheme) or None
            except NotCanonical:
                pass
        fp = _last_value(headers, "X-Forwarded-Port")
        if fp is not None and fp.isascii() and fp.isdigit() and 0 < int(fp) <= 65535:
            ctx.forwarded_port = str(int(fp))
    if ctx.forwarded_port is None:
        transport = request.transport
        sock = transport.get_extra_info("sockname") if transport is not None else None
        if sock:
            ctx.forwarded_port = str(sock[1])


class RequestLabels:
    """Cached metric label children: the request path never builds a label tuple twice."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int, str], Any] = {}
        self.durations: dict[str, Any] = {}

    def observe(self, route: str, method: str, status: int, decision: str, seconds: float) -> None:
        key = (route, method, status, decision)
        c = self.requests.get(key)
        if c is None:
            if len(self.requests) > 10000:  # bounded even if something unexpected varies
                self.requests.clear()
            c = self.requests[key] = metrics.counter_value(
                metrics.REQUESTS.labels(route, method, str(status), decision)
            )
        c.inc(1)
        h = self.durations.get(route)
        if h is None:
            h = self.durations[route] = metrics.histogram_recorder(metrics.REQUEST_DURATION, route)
        h.observe(seconds)


class RequestPath:
    """The request half of the gateway: ``handle`` and what it calls. Mixed into
    ``gateway.server.Gateway``, which sets the attributes declared here."""

    runtime: Runtime
    scheme: str
    edge: EdgeLimits
    stopping: bool
    inflight: int
    _count_inflight: bool
    _labels: RequestLabels

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rt = self.runtime  # read once: a reload never changes the rules under this request
        headers = request.headers
        peer = parse_ip(request.remote or "") or ipaddress.IPv4Address(0)
        client, trusted = resolve_client(rt, peer, headers)
        rid = headers.get("X-Request-Id") if trusted else None
        if rid is None or _REQUEST_ID.fullmatch(rid) is None:
            rid = new_request_id()
        _set_log_request_id(rid)  # this request's task only (gateway/logsetup.py)
        host = headers.get("Host", "")
        scheme = self.scheme
        if trusted and scheme == "http":
            fp = _last_value(headers, "X-Forwarded-Proto")
            if fp in ("https", "http"):
                scheme = fp
        method = request.method
        if method not in _METHOD_LABELS:
            method = _logged_method(method)
        ctx = RequestContext(
            request_id=rid,
            method=method,
            raw_path=request.raw_path.split("?", 1)[0],
            path=request.path,
            query_string=request.query_string,
            host=host,
            scheme=scheme,
            peer_ip=peer,
            client_ip=client,
            headers=headers,
            request=request,
            runtime=rt,
            tls=tlsutil.peer_info(request.transport),
            from_trusted_proxy=trusted,
            raw_target=request.raw_path,
            http_version=(request.version.major, request.version.minor),
        )
        tcfg = rt.config.tracing
        if tcfg.propagate or rt.otel is not None:  # spans need a trace even when none is sent upstream
            ctx.trace_upstream = tcfg.propagate
            if rt.otel is None:
                ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.tracestate = tracing.start(
                    headers, trusted, tcfg
                )
            else:  # OpenTelemetry spans (gateway/otel.py): the server span's ids
                rt.otel.begin(ctx, headers, trusted)
        _set_log_trace_id(ctx.trace_id)
        resp: web.StreamResponse | None = None
        rt.enter()
        self.inflight += 1
        if self._count_inflight:
            metrics.IN_FLIGHT.inc()
        try:
            resp = await self._serve(rt, request, ctx)
            if self.stopping:
                resp.force_close()  # draining: this connection's last response says Connection: close
            if "Upgrade" in headers:
                # Never forwarded (h2c, websocket): answered as plain HTTP/1.1, then the connection
                # is closed, since the parser may have stopped reading it as HTTP.
                resp.force_close()
            return resp
        except asyncio.CancelledError:
            # The client went away (handler cancellation): the upstream call is cancelled with us.
            timed_out = getattr(request.protocol, "timeout_reason", None)
            ctx.decision, ctx.reason = "error", ctx.reason or timed_out or "client_disconnected"
            if not ctx.status:
                ctx.status = 499
            raise
        except Exception:
            log.exception("request %s failed in the gateway", rid)
            ctx.decision, ctx.reason, ctx.status = "error", "internal_error", 500
            resp = problems.render(Problem(problems.INTERNAL, internal_reason="gateway_error"), rid)
            return resp
        finally:
            proto = request.protocol
            if proto is not None:
                proto.body_request = None  # type: ignore[attr-defined]
            self._finish(rt, ctx, resp)

    def refuse_unknown_method(self, request: web.BaseRequest, exc: BadHttpMethod) -> web.Response:
        """405 ``method_not_allowed`` for a request line whose method the HTTP parser refused;
        counted and audited like any request. The method token (as the parser quoted it) is
        kept only when it is a short RFC 9110 token."""
        rt = self.runtime
        m = _METHOD_TOKEN.search(str(getattr(exc, "message", "")))
        peer = parse_ip(request.remote or "") or ipaddress.IPv4Address(0)
        ctx = RequestContext(
            request_id=new_request_id(),
            method=_logged_method(m.group(1)) if m else "OTHER",
            raw_path="",
            path="",
            query_string="",
            host="",
            scheme=self.scheme,
            peer_ip=peer,
            client_ip=peer,
            headers=request.headers,
            request=request,
            runtime=rt,
            tls=tlsutil.peer_info(request.transport),
        )
        allow = ", ".join(rt.config.ingress.allowed_methods)
        rt.enter()  # _finish leaves the runtime and counts the request out
        self.inflight += 1
        if self._count_inflight:
            metrics.IN_FLIGHT.inc()
        resp = None
        try:
            resp = self._deny(
                ctx,
                Problem(
                    problems.METHOD_NOT_ALLOWED,
                    detail=f"Allowed methods: {allow}",
                    internal_reason="unknown_method",
                    headers={"Allow": allow},
                ),
            )
            return resp
        finally:
            self._finish(rt, ctx, resp)

    def _deny(self, ctx: RequestContext, problem: Problem, decision: str = "deny") -> web.Response:
        ctx.status = problem.status or 500
        ctx.decision = decision
        ctx.reason = problem.log_reason
        resp = problems.render(problem, ctx.request_id, ctx.response_headers or None)
        resp.headers["Server"] = "portvakt"  # not aiohttp's default (it names versions)
        return resp

    def _canonicalise(
        self, rt: Runtime, request: web.BaseRequest, ctx: RequestContext
    ) -> web.StreamResponse | None:
        """Bring the request to its one canonical form (gateway.canonical) before anything routes
        on it: ``ctx.host``, ``ctx.raw_path``, ``ctx.path`` and ``ctx.target`` are set, or the
        request is refused (or redirected, when configured). Header values that are not UTF-8
        are refused: aiohttp would forward them with the offending bytes silently dropped."""
        try:
            ctx.host = canonical_host(ctx.host, ctx.scheme)
        except NotCanonical as e:
            return self._deny(ctx, Problem(HOST_NOT_CANONICAL, internal_reason=e.reason))
        for name, value in ctx.headers.items():
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return self._deny(
                        ctx,
                        Problem(
                            INVALID_HEADER_VALUE,
                            detail=f"{name} is not valid UTF-8",
                            internal_reason="header_invalid_utf8",
                        ),
                    )
        url = request.rel_url
        query = url.raw_query_string
        sent = ctx.raw_path
        try:
            path, decoded = canonical_path(sent, rt.config.http)
        except NotCanonical as e:
            return self._deny(
                ctx,
                Problem(
                    PATH_NOT_CANONICAL,
                    detail="Request path is ambiguous or malformed",
                    internal_reason=e.reason,
                ),
            )
        except Redirect as r:
            location = r.path + ("?" + query if query else "")
            ctx.status, ctx.decision, ctx.reason = 308, "deny", "escaped_slash_redirect"
            return web.Response(
                status=308,
                headers={
                    "Location": location,
                    "X-Request-Id": ctx.request_id,
                    "Server": "portvakt",
                    "Cache-Control": "no-store",
                },
            )
        ctx.raw_path, ctx.path = path, decoded
        ctx.target = path + ("?" + query if query or "?" in request.raw_path else "")
        forwarded_view(request, ctx)
        return None

    async def _serve(self, rt: Runtime, request: web.BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        method = ctx.method
        if request.version not in _HTTP_VERSIONS:
            # HTTP/0.9 (a request line without version, then nothing) and anything past 1.1 on an
            # HTTP/1 connection: never forwarded; the connection is closed after the answer.
            protocol = request.protocol
            if protocol is not None:
                protocol.close()
            return self._deny(
                ctx,
                Problem(
                    HTTP_VERSION_NOT_SUPPORTED,
                    internal_reason="http_version",
                    headers={"Connection": "close"},
                ),
            )
        edge = self.edge
        if self.inflight > edge.max_requests:
            return self._deny(ctx, edge.overloaded("requests"))
        if method == "CONNECT":
            return self._deny(
                ctx, Problem(BAD_REQUEST, detail="CONNECT is not supported", internal_reason="connect_method")
            )
        target = request.raw_path
        if not target.startswith("/"):
            # Absolute-form (or asterisk/authority-form): never act as a forward proxy. Only an
            # absolute-form target naming this very Host is read as its path.
            abs_host = _absolute_host(target)
            if abs_host is None or not _same_host(abs_host, ctx.host, ctx.scheme):
                return self._deny(
                    ctx,
                    Problem(
                        BAD_REQUEST,
                        detail="Request target must be a path",
                        internal_reason="absolute_form_target",
                    ),
                )
            ctx.raw_path = request.rel_url.raw_path
        refused = self._canonicalise(rt, request, ctx)
        if refused is not None:
            return refused
        persons = rt.persons
        if persons is not None and ctx.path.startswith(persons.prefix + "/"):
            denied = await persons.guard(ctx)  # ingress (+ rate limit on login/callback) first
            if denied is not None:
                resp = self._deny(ctx, denied.problem)
                if denied.close:
                    resp.force_close()
                return resp
            deleg = rt.delegation
            if deleg is not None and deleg.owns(ctx.path):
                page: web.StreamResponse = await deleg.serve(ctx, request, persons)  # never proxied
                return page  # parties, admin API
            page = await persons.serve(ctx, request)  # login endpoints: never proxied
            return page
        cp = rt.persons_case_prefix
        route = rt.match(ctx.host, ctx.raw_path)
        if (rt.case_guard and rt.case_variant(ctx.host, ctx.raw_path) is not None) or (
            cp is not None and ctx.path[: len(cp)].lower() == cp
        ):
            # '/INNSYN/x' for route '/innsyn/': a case-insensitive upstream serves the protected path
            return self._deny(
                ctx,
                Problem(
                    PATH_NOT_CANONICAL,
                    detail="Request path is a case variant of a route",
                    internal_reason="case_variant_of_route",
                ),
            )
        if route is None:
            return self._deny(ctx, Problem(NOT_FOUND))
        ctx.route = route

        # Body prefix: read before the chain (the WAF inspects it) and before any upstream contact.
        body_limit = rt.body_limit  # the one place of the body limit and its mode (filters/ingress.py)
        more_body = False
        if request.body_exists or "Transfer-Encoding" in request.headers:
            problem = edge.body_problem(request)
            if problem is not None:
                resp = self._deny(ctx, problem)
                resp.force_close()  # the unread body would be read as the next request
                return resp
        if request.body_exists:
            request.protocol.watch_body(request)  # type: ignore[attr-defined]  # the edge sweep's body bounds
            clen = request.content_length
            ctx.body_size_hint = clen
            problem = body_limit.check(ctx, clen) if clen is not None else None
            if problem is not None:
                # Not read here: aiohttp drains the unread body after the response (bounded by its
                # lingering time) so the client reads the 413 instead of a connection reset.
                return self._deny(ctx, problem)
            if headers_expect_continue(request):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            want = route.body_prefix_bytes
            try:
                if clen is not None and clen <= want:
                    body = await request.content.readexactly(clen) if clen else b""
                    ctx.body, ctx.body_complete = body, True
                else:
                    body, complete = await _read_prefix(request.content, want)
                    ctx.body, ctx.body_complete = body, complete
                    more_body = not complete
            except (asyncio.IncompleteReadError, ConnectionError, HttpProcessingError) as e:
                if isinstance(e, ChunkSizeOutOfRange):
                    return self._refuse_chunk(request, ctx)
                return self._body_failed(ctx, type(e).__name__)
            ctx.bytes_in = len(ctx.body)
            problem = body_limit.check(ctx, len(ctx.body))
            if problem is not None:
                return self._deny(ctx, problem)
        else:
            ctx.body_complete = True

        if route.filters:
            denied = await run_chain(route.filters, ctx)
            if denied is not None:
                resp = self._deny(ctx, denied.problem)
                if denied.close:
                    resp.force_close()  # the filter asked: nothing after this request is read
                return resp

        problem = await rt.audit.before_forward(ctx)
        if problem is not None:
            return self._deny(ctx, problem)

        if ctx.otel is not None:
            ctx.otel.upstream(ctx, route.upstream_name)  # client span: the upstream's parent
        try:
            forwarded = await forward(
                ctx,
                request,
                rt.upstreams.get(route.upstream_name),
                body_limit=body_limit.cap,
                has_more_body=more_body,
                forwarder=rt.forwarder,
                drop=rt.request_drop
                if ctx.from_trusted_proxy
                else (rt.request_drop_untrusted or rt.request_drop),
                drop_prefixes=rt.request_drop_prefixes,
                guarded_cookies=rt.guarded_cookies,
            )
        except BodyTooLarge:
            return self._deny(ctx, body_limit.problem())
        except ClientBodyError as e:
            if str(e) == ChunkSizeOutOfRange.__name__:
                return self._refuse_chunk(request, ctx)
            return self._body_failed(ctx, str(e))
        except UpstreamError as e:
            return self._deny(ctx, e.problem, decision="error")
        if more_body:
            body_limit.check(ctx, ctx.bytes_in)  # detect mode: a streamed body over the limit
        ctx.decision = "allow"
        if ctx.reason is None and ctx.detections:
            ctx.reason = ctx.detections[0].reason
        return forwarded

    def _body_failed(self, ctx: RequestContext, error: str) -> web.Response:
        if error == "BodyTimeout":
            resp = self._deny(
                ctx,
                Problem(
                    REQUEST_TIMEOUT,
                    detail="Request body not received in time",
                    internal_reason="request_body_timeout",
                ),
            )
        else:
            resp = self._deny(
                ctx,
                Problem(
                    BAD_REQUEST,
                    detail="The request body could not be read",
                    internal_reason=f"body_read_failed:{error}",
                ),
            )
        resp.force_close()  # the rest of the body is unread: the connection cannot carry another request
        return resp

    def _refuse_chunk(self, request: web.BaseRequest, ctx: RequestContext) -> web.Response:
        """400 ``request_smuggling`` for a chunk size out of range; the connection closes after it
        (nothing after that chunk line is parsed)."""
        if request.protocol is not None:
            request.protocol.close()
        return self._deny(
            ctx,
            Problem(
                REQUEST_SMUGGLING,
                detail="Chunk size out of range",
                internal_reason="chunk_size_out_of_range",
                headers={"Connection": "close"},
            ),
        )

    def _finish(self, rt: Runtime, ctx: RequestContext, resp: web.StreamResponse | None) -> None:
        if not ctx.status and resp is not None:
            ctx.status = resp.status
        if (
            not ctx.bytes_out
            and resp is not None
            and isinstance(resp, web.Response)
            and resp.body is not None
        ):
            ctx.bytes_out = len(resp.body)  # type: ignore[arg-type]
        duration = time.monotonic() - ctx.started
        route = ctx.route.name if ctx.route is not None else _NO_ROUTE
        method = ctx.method if ctx.method in _METHOD_LABELS else "OTHER"
        try:
            self._labels.observe(route, method, ctx.status, ctx.decision, duration)
            accesslog.record(ctx, duration)
            rt.audit.record(ctx)
            if ctx.otel is not None:
                ctx.otel.end(ctx)
        except Exception:
            log.exception("recording request %s failed", ctx.request_id)
        finally:
            self.inflight -= 1
            if self._count_inflight:
                metrics.IN_FLIGHT.dec()
            rt.leave()

    def record_refused(self, request: web.BaseRequest, exc: HttpProcessingError) -> web.Response:
        """The answer to a request aiohttp's parser refused, recorded like any other request:
        one access-log line, one audit record with the precise reason, the request metrics."""
        rt = self.runtime
        reason, internal = classify_parser_error(exc)
        peer = parse_ip(request.remote or "") or ipaddress.IPv4Address(0)
        ctx = RequestContext(
            request_id=new_request_id(),
            method="UNKNOWN",
            raw_path="",
            path="",
            query_string="",
            host="",
            scheme=self.scheme,
            peer_ip=peer,
            client_ip=peer,
            headers=_NO_HEADERS,
            request=request,
            runtime=rt,
            tls=tlsutil.peer_info(request.transport),
        )
        rt.enter()
        self.inflight += 1
        if self._count_inflight:
            metrics.IN_FLIGHT.inc()
        resp: web.Response | None = None
        try:
            resp = self._deny(ctx, Problem(reason, internal_reason=internal))
            return resp
        finally:
            self._finish(rt, ctx, resp)


def headers_expect_continue(request: web.BaseRequest) -> bool:
    exp = request.headers.get("Expect")
    return exp is not None and exp.lower() == "100-continue" and request.version >= (1, 1)


def _same_host(a: str, b: str, scheme: str) -> bool:
    try:
        return canonical_host(a, scheme) == canonical_host(b, scheme)
    except NotCanonical:
        return False


def _absolute_host(target: str) -> str | None:
    """The authority of an absolute-form target (``http://host[:port]/...``), lower-case."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority:
        return None
    return authority.lower()


async def _read_prefix(content: Any, want: int) -> tuple[bytes, bool]:
    """Up to ``want`` bytes of the body; complete=True when the body ended within them."""
    buf = bytearray()
    while len(buf) < want:
        chunk = await content.read(want - len(buf))
        if not chunk:
            return bytes(buf), True
        buf += chunk
    return bytes(buf), content.at_eof()
