"""The public listener and the per-request path; reload and graceful shutdown.

Per request (``Gateway.handle``): read the runtime once, resolve request id and client IP, build
the ``RequestContext``, refuse what a reverse proxy must never do (CONNECT, absolute-form targets
for another host), match a route (404 ``no_route``), read the body prefix the route needs (the
WAF inspects it; an oversize body is refused before the upstream is contacted), run the chain,
ask the audit sink (strict durability) and forward. Every request, whatever its outcome, ends in
``_finish``: metrics, one access-log line and exactly one ``audit.record(ctx)``.

Reload (SIGHUP, ``POST /-/reload``): load the config, build and start a complete new runtime,
swap one reference. The old runtime is closed after its in-flight requests finished.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import random
import re
import signal
import ssl
import time
import uuid
from functools import lru_cache
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from multidict import CIMultiDict, CIMultiDictProxy

from filters.ingress import BODY_TOO_LARGE, HEADERS_TOO_LARGE, REQUEST_SMUGGLING, URI_TOO_LONG
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
from gateway.config import HTTP_METHODS, Config, ConfigError, load_config
from gateway.context import RequestContext
from gateway.edge import REQUEST_TIMEOUT, EdgeLimits, EdgeRequestHandler, EdgeTCPSite
from gateway.framing import ChunkGuard, ChunkSizeOutOfRange
from gateway.problems import BAD_REQUEST, NOT_FOUND, Problem
from gateway.proxy import BodyTooLarge, ClientBodyError, UpstreamError, forward
from gateway.runtime import Runtime, build_runtime

log = logging.getLogger("portvakt.server")
_set_log_request_id = logsetup.REQUEST_ID.set
_set_log_trace_id = logsetup.TRACE_ID.set

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_METHOD_LABELS = frozenset(HTTP_METHODS)
_NO_ROUTE = "(none)"
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
# The method of a request line the parser refused, as aiohttp quotes it: "b'CUST / HTTP/1.1'"
_METHOD_TOKEN = re.compile(r"b'([!#$%&*+.^_`|~0-9A-Za-z-]{1,20}) ")
_getrandbits = random.getrandbits
# UUIDv4 layout (version 4, RFC 4122 variant) from the process's PRNG: request ids must be
# unique, not secret, and this is several times cheaper than uuid.uuid4() (an os.urandom call
# and a UUID object per request). Each worker is a fresh interpreter with its own seed.
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    return "%032x" % ((_getrandbits(128) & _V4_CLEAR) | _V4_SET)


@lru_cache(maxsize=8192)
def parse_ip(text: str) -> Any:
    """An address from a peer name or X-Forwarded-For hop (IPv4-mapped IPv6 read as IPv4);
    None when it is not an address."""
    t = text.strip()
    if t.startswith("[") and "]" in t:
        t = t[1 : t.index("]")]
    try:
        ip = ipaddress.ip_address(t)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve_client(rt: Runtime, peer: Any, headers: Any) -> tuple[Any, bool]:
    """(client IP, peer is a trusted proxy). Through trusted proxies, the client is the rightmost
    X-Forwarded-For hop that is not itself trusted (so a client cannot spoof the left part)."""
    if not rt.is_trusted(peer):
        return peer, False
    values = headers.getall("X-Forwarded-For", ())
    if not values:
        return peer, True
    client = peer
    for hop in reversed(",".join(values).split(",")):
        ip = parse_ip(hop)
        if ip is None:
            break
        client = ip
        if not rt.is_trusted(ip):
            break
    return client, True


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


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _ProblemRequestHandler(EdgeRequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser rejects as problem+json.

    aiohttp's own error page is text/plain and quotes the offending bytes (which can be the start
    of an ``Authorization`` or ``IntegrasjonPassord`` value); ours is the problem of the precise
    reason (414, 431, 400 ``request_smuggling``...) with a request id, and the refusal is
    recorded like every other request (access log, audit, metrics) by the server's
    ``record_refused``. The connection is closed as aiohttp does.
    """

    def data_received(self, data: bytes) -> None:
        """The parser first; then ``ChunkGuard`` follows the same bytes and fails the body of a
        request that declares an out-of-range chunk (gateway.framing), before its handler (which
        runs only after this returns) can forward anything. After that nothing more is parsed."""
        d = self.__dict__
        if d.get("_chunk_refused"):
            return
        super().data_received(data)
        close_after = d.get("_close_after_request")
        if close_after is not None and self._request_count > close_after:
            d["_close_after_request"] = None
            self.close()  # the request the guard lost track in is queued: it is the last one
        guard = d.get("_chunk_guard")
        if guard is None:
            limit = getattr(self._manager, "chunk_limit", None)
            if limit is None:
                return
            guard = d["_chunk_guard"] = ChunkGuard(*limit())
        if guard.done:
            return
        if self._messages:
            d["_body_payload"] = self._messages[-1][1]
        size = guard.feed(data)
        if size is not None:
            d["_chunk_refused"] = True
            payload = d.get("_body_payload")
            if payload is not None:
                payload.set_exception(ChunkSizeOutOfRange(size, guard.limit))
        elif guard.lost:
            # Framing the guard cannot follow (HTTP/0.9, an upgrade, an oversized or unreadable
            # header block): this request is answered, and nothing behind it goes unwatched.
            if guard.lost_mid_head:  # the parser has not finished this request's headers yet
                d["_close_after_request"] = self._request_count
            else:
                self.close()

    def handle_error(self, request, status=500, exc=None, message=None):  # type: ignore[no-untyped-def]
        gateway = getattr(self._manager, "gateway", None)
        if isinstance(exc, BadHttpMethod) and gateway is not None:
            # A method token the C parser (llhttp) does not know, e.g. CUST: the same 405 that
            # ingress gives a known method outside its allow-list, counted and audited.
            out = gateway.refuse_unknown_method(request, exc)
            out.force_close()  # the parser stopped reading this connection as HTTP
            return out
        resp = super().handle_error(request, status, exc, message)
        del resp
        record = getattr(self._manager, "record_refused", None)
        if record is not None and isinstance(exc, HttpProcessingError):
            out = record(request, exc)
        else:
            reason = problems.BAD_REQUEST if 400 <= status < 500 else problems.INTERNAL
            out = problems.render(Problem(reason, status=status), uuid.uuid4().hex, {"Server": "portvakt"})
        out.force_close()
        return out


def classify_parser_error(exc: HttpProcessingError) -> tuple[str, str]:
    """(reason, internal reason) for what aiohttp's parser (llhttp) refused. Told apart by type
    and message (aiohttp 3.14; tests/e2e/test_parser_errors.py pins each shape)."""
    msg = str(getattr(exc, "message", "") or exc).lower()
    if isinstance(exc, LineTooLong):
        # The request line arrives as a bytearray buffer, header names and values as bytes.
        if isinstance(exc.args[0] if exc.args else None, bytearray):
            return URI_TOO_LONG, "request_line_too_long"
        return HEADERS_TOO_LARGE, "header_line_too_long"
    if "too many headers" in msg:
        return HEADERS_TOO_LARGE, "too_many_headers"
    if isinstance(exc, InvalidURLError):
        return PATH_NOT_CANONICAL, "invalid_target"
    if isinstance(exc, BadHttpMethod):
        return problems.BAD_REQUEST, "bad_method"
    if isinstance(exc, BadStatusLine):
        return problems.BAD_REQUEST, "bad_request_line"
    for needle, internal in _FRAMING_ERRORS:
        if needle in msg:
            return REQUEST_SMUGGLING, internal
    if "duplicate 'host'" in msg:
        return HOST_NOT_CANONICAL, "duplicate_host"
    if "missing 'host'" in msg:
        return HOST_NOT_CANONICAL, "missing_host"
    if "header" in msg:
        return problems.BAD_REQUEST, "invalid_header"
    return problems.BAD_REQUEST, "malformed_request"


_FRAMING_ERRORS = (
    ("transfer-encoding can't be present with content-length", "te_and_cl"),
    ("content-length can't be present with transfer-encoding", "te_and_cl"),
    ("duplicate content-length", "duplicate_content_length"),
    ("whitespace after header value", "obs_fold"),
    ("chunk", "bad_chunk_size"),
    ("transfer-encoding", "bad_transfer_encoding"),
    ("content-length", "invalid_content_length"),
)


class _ProblemServer(web.Server):
    gateway: Gateway | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class _Labels:
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


class Gateway:
    """One worker's gateway: runtime reference, public listener(s), reload, shutdown."""

    def __init__(self, config_path: str, config: Config, runtime: Runtime, *, reuse_port: bool = False):
        self.config_path = config_path
        self.config = config
        self.runtime = runtime
        self.reuse_port = reuse_port
        self.secrets: dict[str, Any] = {}
        self.tls: tlsutil.ReloadableTLS | None = None
        self.scheme = "http" if config.server.tls is None else "https"
        self._labels = _Labels()
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._runner: web.ServerRunner | None = None
        self.reload_count = 0
        self.stopping = False
        self.edge = EdgeLimits(config.server)  # connection/request caps and client-side timeouts
        self._edge_sweep: asyncio.Task[None] | None = None
        self.inflight = 0
        # Single process: the gauge reads self.inflight when scraped (no lock per request). Under
        # prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR set by hand) it must be counted in the files.
        self._count_inflight = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if not self._count_inflight:
            metrics.IN_FLIGHT.set_function(lambda: self.inflight)

    # ---- the request path -------------------------------------------------------------------

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
        ctx = RequestContext(
            request_id=rid,
            method=request.method,
            raw_path=request.raw_path.split("?", 1)[0],
            path=request.path,
            query_string=request.query_string,
            host=host,
            scheme=scheme,
            peer_ip=peer,
            client_ip=client,
            headers=headers,
            request=request,  # type: ignore[arg-type]
            runtime=rt,
            tls=tlsutil.peer_info(request.transport),
            from_trusted_proxy=trusted,
        )
        tcfg = rt.config.tracing
        if tcfg.propagate:
            if tcfg.otlp is None:
                ctx.trace_id, ctx.span_id, ctx.trace_flags, ctx.tracestate = tracing.start(
                    headers, trusted, tcfg
                )
            else:  # OpenTelemetry spans (gateway/otel.py): the server span's ids
                rt.components["otel"].begin(ctx, headers, trusted)
        _set_log_trace_id(ctx.trace_id)
        resp: web.StreamResponse | None = None
        rt.inflight += 1
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
            method=m.group(1) if m else "OTHER",
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
            tls=tlsutil.peer_info(request.transport),  # type: ignore[arg-type]
        )
        allow = ", ".join(rt.config.ingress.allowed_methods)
        rt.inflight += 1  # _finish leaves the runtime and counts the request out
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
                return self._deny(ctx, denied.problem)
            deleg = rt.delegation
            if deleg is not None and deleg.owns(ctx.path):
                return await deleg.serve(ctx, request, persons)  # parties, admin API: never proxied
            return await persons.serve(ctx, request)  # login endpoints: never proxied
        route = rt.match(ctx.host, ctx.raw_path)
        if rt.case_guard and rt.case_variant(ctx.host, ctx.raw_path) is not None:
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
        limit = rt.max_body_bytes
        more_body = False
        if request.body_exists or "Transfer-Encoding" in request.headers:
            refused = edge.body_problem(request)
            if refused is not None:
                resp = self._deny(ctx, refused)
                resp.force_close()  # the unread body would be read as the next request
                return resp
        if request.body_exists:
            request.protocol.body_request = request  # type: ignore[union-attr]  # the edge sweep's body timeout
            clen = request.content_length
            ctx.body_size_hint = clen
            if clen is not None and clen > limit:
                # Not read here: aiohttp drains the unread body after the response (bounded by its
                # lingering time) so the client reads the 413 instead of a connection reset.
                return self._deny(ctx, Problem(BODY_TOO_LARGE, detail=f"The limit is {limit} bytes"))
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
            if len(ctx.body) > limit:
                return self._deny(ctx, Problem(BODY_TOO_LARGE, detail=f"The limit is {limit} bytes"))
        else:
            ctx.body_complete = True

        if route.filters:
            denied = await run_chain(route.filters, ctx)
            if denied is not None:
                return self._deny(ctx, denied.problem)

        components = rt.components
        audit = components.get("audit")
        if audit is not None:
            refused = await audit.before_forward(ctx)
            if refused is not None:
                return self._deny(ctx, refused)

        if ctx.otel is not None:
            ctx.otel.upstream(ctx, route.upstream_name)  # client span: the upstream's parent
        try:
            resp = await forward(
                ctx,
                request,
                components["upstreams"].get(route.upstream_name),
                body_limit=limit,
                has_more_body=more_body,
                forwarder=components.get("forwarder"),
                drop=rt.request_drop
                if ctx.from_trusted_proxy
                else (rt.request_drop_untrusted or rt.request_drop),
                drop_prefixes=rt.request_drop_prefixes,
            )
        except BodyTooLarge:
            return self._deny(ctx, Problem(BODY_TOO_LARGE, detail=f"The limit is {limit} bytes"))
        except ClientBodyError as e:
            if str(e) == ChunkSizeOutOfRange.__name__:
                return self._refuse_chunk(request, ctx)
            return self._body_failed(ctx, str(e))
        except UpstreamError as e:
            return self._deny(ctx, e.problem, decision="error")
        ctx.decision = "allow"
        if ctx.reason is None and ctx.detections:
            ctx.reason = ctx.detections[0].reason
        return resp

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
            audit = rt.components.get("audit")
            if audit is not None:
                audit.record(ctx)
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
            request=request,  # type: ignore[arg-type]
            runtime=rt,
            tls=tlsutil.peer_info(request.transport),
        )
        rt.inflight += 1
        self.inflight += 1
        if self._count_inflight:
            metrics.IN_FLIGHT.inc()
        resp: web.Response | None = None
        try:
            resp = self._deny(ctx, Problem(reason, internal_reason=internal))
            return resp
        finally:
            self._finish(rt, ctx, resp)

    # ---- listener ----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        ing = cfg.ingress
        server = _ProblemServer(
            self.handle,
            handler_cancellation=True,  # a client disconnect cancels the upstream call
            # aiohttp's own parser limits sit above the ingress limits so ingress answers first
            # with a problem; they cannot change on reload (the listener keeps them).
            max_line_size=max(8190, ing.max_uri_bytes + 64),
            max_field_size=max(8190, ing.max_header_bytes),
            max_headers=max(128, ing.max_headers * 2),
            auto_decompress=False,  # request bodies go upstream as sent
            keepalive_timeout=cfg.server.keepalive_timeout_seconds,
            access_log=None,
        )
        server.record_refused = self.record_refused  # type: ignore[attr-defined]
        server.edge = self.edge  # type: ignore[attr-defined]  # read by each connection's handler
        server.gateway = self
        server.chunk_limit = lambda: (  # type: ignore[attr-defined]
            self.runtime.max_body_bytes,
            self.config.ingress.max_header_bytes + self.config.ingress.max_uri_bytes + 1024,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.server.shutdown_grace_seconds
        )
        await self._runner.setup()
        host, port = split_listen(cfg.server.listen)
        ssl_ctx = None
        if cfg.server.tls is not None and not cfg.server.plain_http:
            self.tls = tlsutil.ReloadableTLS(cfg.server.tls, cfg.resolve_path)
            ssl_ctx = self.tls.front
        else:
            self.scheme = "http"
        site = EdgeTCPSite(
            self._runner,
            host,
            port,
            ssl_context=ssl_ctx,
            backlog=1024,
            reuse_port=self.reuse_port or None,
            shutdown_timeout=cfg.server.shutdown_grace_seconds,
            ssl_handshake_timeout=cfg.server.tls_handshake_timeout_seconds,
        )
        await site.start()
        self._edge_sweep = asyncio.create_task(self.edge.run(server))
        log.info("public listener on %s://%s:%d", self.scheme, host, port)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded grace), close the runtime.
        ``grace``: a shorter drain than ``server.shutdown_grace_seconds`` (an orphaned worker)."""
        self.stopping = True
        if self._runner is not None:
            if grace is not None:
                self._runner._shutdown_timeout = grace  # aiohttp's runner keeps it there
            await self._runner.cleanup()
        if self._edge_sweep is not None:
            self._edge_sweep.cancel()
        for t in list(self._retiring):
            t.cancel()
        await self.runtime.close()

    # ---- reload -----------------------------------------------------------------------------

    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config and swap in a new runtime. Returns (ok, problems)."""
        async with self._reload_lock:
            ok, errors = await self._reload()
            self.reload_count += 1
            metrics.CONFIG_LAST_SUCCESSFUL.set(1 if ok else 0)
            if ok:
                metrics.CONFIG_RELOADS.labels("success").inc()
                metrics.CONFIG_LAST_SUCCESS.set(time.time())
                metrics.init_route_series([r.name for r in self.runtime.routes], self.config.upstreams)
                log.info("config reloaded: runtime generation %d", self.runtime.generation)
            else:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "config reload failed (%d problems), keeping generation %d",
                    len(errors),
                    self.runtime.generation,
                )
                for problem in errors:  # one line each
                    log.error("config reload problem: %s", problem.replace("\n", " "))
            return ok, errors

    async def _reload(self) -> tuple[bool, list[str]]:
        from gateway.admin import resolve_reload_token

        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            # Every layer at once, as check-config lists it (not only the schema's share).
            from gateway.cli import check_config

            try:
                every = await asyncio.to_thread(check_config, str(self.config_path))
            except Exception:  # the short list is still the truth
                log.debug("listing every problem failed", exc_info=True)
                every = []
            return False, every or list(e.problems)
        try:
            token = resolve_reload_token(cfg)
        except ValueError as e:
            return False, [f"{self.config_path}: {e}"]
        new_tls = None
        if self.tls is not None:
            if cfg.server.tls is None:
                return False, [
                    f"{self.config_path}: server.tls: cannot switch a TLS listener to plain HTTP on reload"
                ]
            try:
                new_tls = tlsutil.build_context(cfg.server.tls, cfg.resolve_path)
            except ValueError as e:
                return False, [f"{self.config_path}: {e}"]
        old = self.runtime
        try:
            rt = build_runtime(cfg, old, secrets=self.secrets)
        except Exception:
            from gateway.cli import build_problems

            log.warning("building the new runtime failed", exc_info=log.isEnabledFor(logging.DEBUG))
            return False, await build_problems(cfg, str(self.config_path))
        try:
            await rt.start()
        except Exception as e:
            from gateway.cli import _build_problem

            log.warning("starting the new runtime failed", exc_info=log.isEnabledFor(logging.DEBUG))
            await rt.close()
            return False, [_build_problem(str(self.config_path), e)]
        for key in ("listen", "workers", "plain_http"):
            if getattr(cfg.server, key) != getattr(self.config.server, key):
                log.warning("server.%s changed: takes effect after a restart", key)
        if cfg.admin.listen != self.config.admin.listen:
            log.warning("admin.listen changed: takes effect after a restart")
        if new_tls is not None and self.tls is not None and cfg.server.tls is not None:
            self.tls.front.verify_mode = new_tls.verify_mode
            self.tls.current = new_tls
        if cfg.logging != self.config.logging:
            from gateway import logsetup

            logsetup.apply(cfg)
        problems.set_type_base(cfg.problems.type_base)
        self.config = cfg
        self.edge.configure(cfg.server)
        self._reload_token = token
        self.runtime = rt  # the swap: one assignment
        task = asyncio.create_task(old.retire(max(60.0, cfg.server.shutdown_grace_seconds)))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True, []

    # ---- admin target interface (see gateway/admin.py) --------------------------------------

    _reload_token: str | None = None
    guard_reload = True  # False in a worker: its unix-socket admin answers only its supervisor

    def reload_token(self) -> str | None:
        return self._reload_token if self.guard_reload else None

    def ready(self) -> tuple[bool, dict[str, Any]]:
        rt = self.runtime
        try:
            deps = rt.readiness()
        except Exception as e:  # a broken readiness probe is "not ready", not a 500
            log.exception("readiness check failed")
            deps = {"readiness": f"down: {type(e).__name__}"}
        ok = not self.stopping and not any(str(v).startswith("down") for v in deps.values())
        return ok, {"config": "loaded", "generation": rt.generation, "dependencies": deps}

    async def jwks(self) -> Any:
        fwd = self.runtime.components.get("forwarder")
        fn = getattr(fwd, "jwks", None) if fwd is not None else None
        if fn is None:
            return None
        out = fn()
        if asyncio.iscoroutine(out):
            out = await out
        return out


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


async def serve(
    config_path: str,
    *,
    reuse_port: bool = False,
    admin: bool = True,
    admin_socket: str | None = None,
    worker_index: int | None = None,
    on_ready: Any = None,
) -> int:
    """Run one gateway process until SIGTERM/SIGINT. Returns the exit code.

    ``admin``: serve the admin listener on ``admin.listen`` (False in a worker under the
    supervisor, which serves it; the worker's own admin endpoints go to ``admin_socket``).
    ``on_ready()`` is called once the listeners accept connections.
    """
    from gateway import admin as admin_mod

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        for p in e.problems:
            print(p, flush=True)
        return 2
    logsetup.apply(cfg)
    problems.set_type_base(cfg.problems.type_base)
    secrets: dict[str, Any] = {}
    if worker_index is not None:
        secrets["worker_index"] = worker_index
    try:
        rt = build_runtime(cfg, None, secrets=secrets)
        await rt.start()
    except Exception as e:  # a stage refused the config: say why, no traceback
        log.debug("runtime build failed", exc_info=True)
        print(f"{config_path}: runtime: {type(e).__name__}: {e}", flush=True)
        return 2
    gw = Gateway(config_path, cfg, rt, reuse_port=reuse_port)
    gw.secrets = secrets
    gw.guard_reload = admin  # a worker's unix-socket admin is private to its supervisor
    if admin:
        try:
            gw._reload_token = admin_mod.resolve_reload_token(cfg)
        except ValueError as e:
            print(f"{config_path}: {e}", flush=True)
            await rt.close()
            return 2
    metrics.CONFIG_LAST_SUCCESS.set(time.time())
    metrics.CONFIG_LAST_SUCCESSFUL.set(1)
    metrics.init_route_series([r.name for r in rt.routes], cfg.upstreams)
    try:
        await gw.start()
    except (OSError, ValueError, ssl.SSLError) as e:
        print(
            f"{config_path}: server: cannot start the public listener on {cfg.server.listen}: {e}", flush=True
        )
        await rt.close()
        return 2
    admin_runner = None
    if admin:
        admin_runner = await admin_mod.start_admin(gw, cfg.admin.listen)
    elif admin_socket:
        admin_runner = await admin_mod.start_admin(gw, None, unix_path=admin_socket)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        t = asyncio.create_task(gw.reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Everything built so far (config, compiled rules, key caches, modules) lives as long as the
    # process: move it out of the collector's view so a full collection does not walk it again.
    gc.collect()
    gc.freeze()

    from gateway import parentwatch

    orphan_watch = asyncio.create_task(parentwatch.watch(stop.set)) if worker_index is not None else None
    log.info("portvakt ready (config %s, generation %d)", config_path, rt.generation)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    grace = cfg.server.shutdown_grace_seconds
    if worker_index is not None and parentwatch.orphaned():
        grace = min(
            grace, parentwatch.ORPHAN_GRACE_SECONDS
        )  # free the port and audit lock for the next supervisor
    if orphan_watch is not None:
        orphan_watch.cancel()
    log.info("shutting down: draining in-flight requests (at most %.1fs)", grace)
    gw.stopping = True
    orphan = worker_index is not None and parentwatch.orphaned()
    t0 = time.monotonic()
    await gw.shutdown(grace)
    if orphan:
        # The runtime is closed (audit records written): skip the admin socket's drain and the
        # interpreter's teardown, which take seconds on a loaded machine while this process
        # still holds the port and the audit-file lock the next supervisor's workers need.
        log.info("orphaned worker exits (shutdown took %.2fs)", time.monotonic() - t0)
        logging.shutdown()
        os._exit(0)
    if admin_runner is not None:
        await admin_runner.cleanup()
    return 0
