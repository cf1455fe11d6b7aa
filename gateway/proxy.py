"""Forwarding to upstreams: one pooled client session per upstream, bodies streamed both ways.

``UpstreamPool`` is built per runtime (sessions opened in ``start()``, closed when the runtime is
retired after its in-flight requests finished). ``forward()`` sends one request whose body prefix
has already been read by the server (``ctx.body``), streams the rest while enforcing
``ingress.max_body_bytes``, and streams the response back. Upstream failures become problems:
refused/reset -> 502 ``upstream_unavailable``, timeout -> 504 ``upstream_timeout``.

Header hygiene: hop-by-hop headers and headers named in ``Connection`` are removed; every client
copy of a header the gateway sets (``X-Request-Id``, ``X-Forwarded-*``, ``Forwarded``, the identity
forwarder's names) is stripped first (names compared lower-case with ``_`` read as ``-``), and the
gateway's own headers are added afterwards, so ``Connection`` can never remove or replace them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from gateway import metrics
from gateway.accesslog import ip_text
from gateway.edge import BODILESS_METHODS, OVERLOADED
from gateway.problems import UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, Problem
from gateway.upstream_conn import GuardedConnector

if TYPE_CHECKING:  # pragma: no cover
    from gateway.config import Config, UpstreamConfig
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.proxy")

# Registered by the ingress filter (it refuses a declared Content-Length over the limit); the
# proxy enforces the same limit while streaming a chunked or lying body, with the same reason.

from gateway.headerpolicy import (  # noqa: E402  (the header lists, re-exported for the runtime)
    FORWARDED_CERT_HEADERS,
    FORWARDED_USER_HEADERS,
    GATEWAY_REQUEST_HEADERS,
    HOP_BY_HOP,
    REQUEST_DROP,
    RESPONSE_DROP,
)

__all__ = [
    "FORWARDED_CERT_HEADERS",
    "FORWARDED_USER_HEADERS",
    "GATEWAY_REQUEST_HEADERS",
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "RESPONSE_DROP",
]

SMALL_BODY = 65536  # responses with a known length up to this are read whole (one write)
STREAM_CHUNK = 16384  # streamed response pieces: one TLS record; a stalled stream holds a few of them
# Upstream read side of a streamed response: aiohttp's StreamReader pauses the upstream socket at
# 2 x read_bufsize (default 64 KiB -> 128 KiB buffered) and the socket transport reads up to
# UPSTREAM_READ_BYTES per recv (asyncio's default is 256 KiB): a stalled client's stream holds
# at most about 2 x 16 + 64 KiB on this side (gateway/upstream_conn.py sets the recv size).
UPSTREAM_READ_BUFSIZE = 16384
_NO_BODY_STATUS = frozenset({204, 304})


class BodyTooLarge(Exception):
    pass


class ClientBodyError(Exception):
    """Reading the rest of the client's body failed (disconnect, broken chunked framing)."""


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer; carries the problem to render."""

    def __init__(self, problem: Problem):
        self.problem = problem


def normalise(name: str) -> str:
    n = name.lower()
    return n.replace("_", "-") if "_" in n else n


# Per-request memo tables, bounded (cleared when full) since clients choose header names and
# every connection's peer is a new address object.
_MEMO_MAX = 4096
_normalised: dict[str, str] = {}


def _normalised_name(name: str) -> str:
    n = _normalised.get(name)
    if n is None:
        if len(_normalised) >= _MEMO_MAX:
            _normalised.clear()
        n = _normalised[name] = normalise(name)
    return n


class _Wait:
    __slots__ = ("deadline", "task", "cancelling", "live", "expired")

    def __init__(self, deadline: float, task: Any):
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()
        self.live = True
        self.expired = False


class HeaderDeadlines:
    """The wait-for-response-headers bound of one upstream, like ``asyncio.timeout`` around the
    request but with one loop timer for all requests instead of one each (arming and cancelling
    a timer per request cost about 10 µs). Every request of the upstream has the same timeout, so
    deadlines arrive in order: a FIFO is a priority queue; the timer is armed for the oldest wait
    still running. On expiry the task is cancelled and ``leave`` turns that cancellation into
    ``TimeoutError`` exactly as ``asyncio.timeout`` does (``uncancel`` accounting, so a client
    disconnect at the same moment stays a cancellation)."""

    __slots__ = ("timeout", "queue", "handle", "loop")

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.queue: deque[_Wait] = deque()
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def enter(self) -> _Wait:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # first use (or a new event loop: the old one's waits are gone)
            self.loop, self.queue, self.handle = loop, deque(), None
        w = _Wait(loop.time() + self.timeout, asyncio.current_task())
        self.queue.append(w)
        if self.handle is None:
            self.handle = loop.call_at(w.deadline, self._fire)
        return w

    def _fire(self) -> None:
        self.handle = None
        q = self.queue
        # Timers fire with millisecond granularity: a wait due within that is due now (asyncio
        # itself runs handles due within its clock resolution).
        now = self.loop.time() + 0.001  # type: ignore[union-attr]
        while q:
            w = q[0]
            if not w.live:
                q.popleft()
            elif w.deadline <= now:
                q.popleft()
                w.live = False
                w.expired = True
                w.task.cancel()
            else:
                self.handle = self.loop.call_at(w.deadline, self._fire)  # type: ignore[union-attr]
                return

    def leave(self, w: _Wait, exc: BaseException | None) -> None:
        """Call when the wait ends (``exc``: what it raised). Raises ``TimeoutError`` when it
        was cancelled by its deadline."""
        w.live = False
        task, w.task = w.task, None  # a finished wait holds nothing of the request
        q = self.queue
        while q and not q[0].live:  # finished waits leave from the front (amortised O(1))
            q.popleft()
        if w.expired and task.uncancel() <= w.cancelling and type(exc) is asyncio.CancelledError:
            raise TimeoutError from exc


class Upstream:
    __slots__ = ("name", "base", "config", "session", "timeout_seconds", "duration", "deadlines", "slots")

    def __init__(self, name: str, config: UpstreamConfig):
        self.name = name
        self.config = config
        self.base = config.url  # validated without trailing slash
        self.timeout_seconds = config.timeout_seconds
        self.session: aiohttp.ClientSession | None = None
        self.duration = metrics.histogram_recorder(metrics.UPSTREAM_DURATION, name)
        self.deadlines = HeaderDeadlines(config.timeout_seconds)
        # One slot per upstream connection: a request waits at most pool_timeout_seconds for one
        # (then 503 overloaded), instead of queueing inside the connector without a bound of its own.
        self.slots = asyncio.Semaphore(config.max_connections)

    async def acquire_slot(self) -> None:
        slots = self.slots
        if not slots.locked():
            await slots.acquire()  # free: returns without suspending
            return
        try:
            async with asyncio.timeout(self.config.pool_timeout_seconds):
                await slots.acquire()
        except TimeoutError:
            metrics.OVERLOAD.labels("upstream_pool").inc()
            log.warning(
                "upstream %s: no free connection within %.1fs", self.name, self.config.pool_timeout_seconds
            )
            raise UpstreamError(
                Problem(
                    OVERLOADED,
                    detail="Try again shortly",
                    headers={"Retry-After": "1"},
                    internal_reason="overloaded_upstream_pool",
                )
            ) from None

    def open(self, resolve: Any) -> None:
        c = self.config
        ssl_ctx: ssl.SSLContext | bool = True
        if c.url.startswith("https://") and c.ca_file:
            ssl_ctx = ssl.create_default_context(cafile=resolve(c.ca_file))
        connector = GuardedConnector(
            limit=c.max_connections, limit_per_host=0, ssl=ssl_ctx, ttl_dns_cache=60, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # connect: pool wait + connect; sock_read: the upstream's silence while we wait for
            # headers or body bytes. The total wait for the headers (timeout_seconds) is bounded
            # in forward(); no total for the body: a long stream (SSE, a large download) is fine
            # as long as bytes keep coming.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=c.connect_timeout_seconds,
                sock_connect=c.connect_timeout_seconds,
                sock_read=c.timeout_seconds,
            ),
            auto_decompress=False,  # bytes pass through as the upstream encoded them
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
            read_bufsize=UPSTREAM_READ_BUFSIZE,
        )


class UpstreamPool:
    """The upstreams of one runtime. Sessions are created in ``start`` (inside the event loop)."""

    def __init__(self, config: Config):
        self._config = config
        self.upstreams = {name: Upstream(name, uc) for name, uc in config.upstreams.items()}

    def get(self, name: str) -> Upstream:
        return self.upstreams[name]

    async def start(self) -> None:
        for u in self.upstreams.values():
            if u.session is None:
                u.open(self._config.resolve_path)

    async def close(self) -> None:
        for u in self.upstreams.values():
            if u.session is not None:
                await u.session.close()
                u.session = None


class BodyState:
    __slots__ = ("too_large", "bytes", "client_error")

    def __init__(self, n: int):
        self.too_large = False
        self.bytes = n
        self.client_error: str | None = None


async def _stream_body(prefix: bytes, content: Any, limit: int, state: BodyState) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while True:
        try:
            chunk = await content.readany()
        except (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError) as e:
            state.client_error = type(e).__name__
            raise
        if not chunk:
            return
        state.bytes += len(chunk)
        if state.bytes > limit:
            state.too_large = True
            raise BodyTooLarge()
        yield chunk


def upstream_headers(
    ctx: RequestContext, drop: frozenset[str], forwarder: Any, drop_prefixes: tuple[str, ...] = ()
) -> CIMultiDict[str]:
    """Headers for the upstream request (see module docstring for the rules). ``drop_prefixes``:
    client headers whose normalised name starts with one of these are stripped too (the identity
    forwarder's namespace, e.g. ``x-portvakt-``)."""
    headers = ctx.headers
    conn = headers.get("Connection")
    if conn:
        # Names listed in Connection are hop-by-hop for this message. The gateway's own headers
        # are added below, after this filtering, so listing them here cannot remove ours.
        drop = drop | {normalise(t.strip()) for t in conn.split(",") if t.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    memo = _normalised.get
    if drop_prefixes:
        for k, v in headers.items():
            n = memo(k) or _normalised_name(k)
            if n not in drop and not n.startswith(drop_prefixes):
                out.add(k, v)
    else:
        for k, v in headers.items():
            if (memo(k) or _normalised_name(k)) not in drop:
                out.add(k, v)
    peer = ip_text(ctx.peer_ip)
    if ctx.from_trusted_proxy:
        # Every X-Forwarded-For line is part of one list (RFC 9110 5.3); the gateway's client-IP
        # resolution reads it the same way, so audit and upstream agree.
        xff = ", ".join(v.strip() for v in headers.getall("X-Forwarded-For", ()) if v.strip())
        out["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
    else:
        out["X-Forwarded-For"] = peer
    # Scheme, host and port: the gateway's own view, or the trusted proxy's (already resolved by
    # the server into ctx.scheme / ctx.forwarded_host / ctx.forwarded_port).
    out["X-Forwarded-Proto"] = ctx.scheme
    host = ctx.forwarded_host or ctx.host
    if host:
        out["X-Forwarded-Host"] = host
    if ctx.forwarded_port:
        out["X-Forwarded-Port"] = ctx.forwarded_port
    out["X-Request-Id"] = ctx.request_id
    if ctx.upstream_headers:
        for k, value in ctx.upstream_headers.items():
            if value is None:
                out.popall(k, None)
            else:
                out[k] = value
    if ctx.trace_id is not None and ctx.trace_upstream:
        out["traceparent"] = f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.trace_flags}"
        if ctx.tracestate:
            out["tracestate"] = ctx.tracestate
    if forwarder is not None:
        for k, v in forwarder.headers(ctx).items():
            out[k] = v
    return out


def _is_utf8(value: str) -> bool:
    """Whether a header value the parser decoded (UTF-8, surrogateescape) was valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sets_guarded_cookie(name: str, value: str, guarded: frozenset[str]) -> bool:
    """A Set-Cookie for a cookie the gateway owns, or a Clear-Site-Data that would clear them."""
    low = name.lower()
    if low == "set-cookie":
        return value.split("=", 1)[0].strip().lower() in guarded
    return low == "clear-site-data" and ('"cookies"' in value or '"*"' in value)


def response_headers(
    up_headers: Any, ctx: RequestContext, guarded_cookies: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    drop = RESPONSE_DROP
    conn = up_headers.get("Connection")
    if conn:
        drop = drop | {t.strip().lower() for t in conn.split(",") if t.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in up_headers.items():
        if guarded_cookies and _sets_guarded_cookie(k, v, guarded_cookies):
            # An upstream shares the gateway's origin: it may not plant, replace or clear the
            # persons' session (session fixation across backends). The name only is logged.
            log.warning(
                "upstream tried to set the gateway's cookie (%s dropped, request %s)", k, ctx.request_id
            )
            continue
        if k.lower() not in drop:
            if not v.isascii() and not _is_utf8(v):
                # aiohttp's writer would drop the bytes that are not UTF-8 without a word (a
                # Latin-1 "\xe9t\xe9" would reach the client as "t"): refused, never altered.
                log.warning("upstream response header %r is not valid UTF-8 (request %s)", k, ctx.request_id)
                raise UpstreamError(
                    Problem(UPSTREAM_UNAVAILABLE, internal_reason="upstream_header_invalid_utf8")
                )
            out.add(k, v)
    out["X-Request-Id"] = ctx.request_id
    out["Server"] = "portvakt"
    for k, v in ctx.response_headers.items():
        out[k] = v
    return out


async def forward(
    ctx: RequestContext,
    request: web.BaseRequest,
    upstream: Upstream,
    *,
    body_limit: int,
    has_more_body: bool,
    drop: frozenset[str],
    forwarder: Any,
    drop_prefixes: tuple[str, ...] = (),
    guarded_cookies: frozenset[str] = frozenset(),
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back.

    Returns the response (already prepared when streamed). Raises ``UpstreamError`` (502/504)
    when nothing was sent to the client yet, ``BodyTooLarge`` when the body passed the limit
    before the upstream answered.
    """
    session = upstream.session
    if session is None:  # runtime closed under us: cannot happen for a runtime with in-flight requests
        raise UpstreamError(Problem(UPSTREAM_UNAVAILABLE, internal_reason="upstream_session_closed"))
    headers = upstream_headers(ctx, drop, forwarder, drop_prefixes)
    state = BodyState(len(ctx.body))
    data: Any
    if has_more_body:
        data = _stream_body(ctx.body, request.content, body_limit, state)
        if ctx.body_size_hint is not None:
            headers["Content-Length"] = str(ctx.body_size_hint)
    elif ctx.body or request.method in ("POST", "PUT", "PATCH"):
        data = ctx.body
    else:
        data = None
    # The canonical target (gateway.canonical): the path the route and its policy were chosen on.
    target = ctx.target or (
        request.raw_path if request.raw_path.startswith("/") else request.rel_url.raw_path_qs
    )
    url = URL(upstream.base + target, encoded=True)
    if data is not None and request.method in BODILESS_METHODS:
        # A body on a method without body semantics (forwarded only in "forward" mode of
        # server.body_on_bodiless_methods, with an exact length): the connection is closed after
        # this exchange (gateway/upstream_conn.py), so a backend that read the body as a second
        # request has nobody to answer.
        headers["Connection"] = "close"
    await upstream.acquire_slot()  # raises UpstreamError (503 overloaded) after pool_timeout_seconds
    try:
        return await _exchange(ctx, request, upstream, session, url, headers, data, state, guarded_cookies)
    finally:
        upstream.slots.release()


async def _exchange(
    ctx: RequestContext,
    request: web.BaseRequest,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    data: Any,
    state: BodyState,
    guarded_cookies: frozenset[str] = frozenset(),
) -> web.StreamResponse:
    t0 = time.perf_counter()
    try:
        deadlines = upstream.deadlines
        wait = deadlines.enter()  # total wait for the response headers
        try:
            up = await session.request(ctx.method, url, headers=headers, data=data, allow_redirects=False)
        except BaseException as e:
            deadlines.leave(wait, e)
            raise
        deadlines.leave(wait, None)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        ctx.upstream_duration = time.perf_counter() - t0
        ctx.bytes_in = state.bytes
        if state.too_large:
            raise BodyTooLarge() from None
        if state.client_error:
            raise ClientBodyError(state.client_error) from None
        raise UpstreamError(_problem_for(e, upstream.name)) from None
    try:
        elapsed = time.perf_counter() - t0
        ctx.upstream_duration = elapsed
        upstream.duration.observe(elapsed)
        return await _respond(ctx, request, up, state, guarded_cookies)
    finally:
        ctx.bytes_in = state.bytes
        up.release()


def _problem_for(e: BaseException, name: str) -> Problem:
    if isinstance(e, TimeoutError):
        log.warning("upstream %s timed out: %s", name, type(e).__name__)
        return Problem(UPSTREAM_TIMEOUT, internal_reason="upstream_timeout")
    log.warning("upstream %s unavailable: %s", name, upstream_error_text(e))
    return Problem(UPSTREAM_UNAVAILABLE, internal_reason="upstream_unavailable")


_SAFE_DETAIL = re.compile(r"[A-Za-z][A-Za-z0-9 '()\-]{0,79}")


def upstream_error_text(e: BaseException) -> str:
    """What an upstream failure may put in the log: the exception's class and, for a refused
    response, the parser's reason up to its first colon. Never the request URL (its query carries
    tokens and codes) nor the parser's excerpt of the response (cookies, bodies)."""
    kind = type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        return f"{kind}: {e.strerror}"
    os_error = getattr(e, "os_error", None)  # aiohttp.ClientConnectorError
    if isinstance(os_error, OSError) and os_error.strerror:
        return f"{kind}: {os_error.strerror}"
    message = getattr(e, "message", None)  # aiohttp.ClientResponseError: the parser's complaint
    if isinstance(message, str):
        head = _SAFE_DETAIL.match(message.split(":", 1)[0].split("\n", 1)[0].strip())
        if head:
            return f"{kind}: {head.group().strip()}"
    return kind


async def _respond(
    ctx: RequestContext,
    request: web.BaseRequest,
    up: aiohttp.ClientResponse,
    state: BodyState,
    guarded_cookies: frozenset[str] = frozenset(),
) -> web.StreamResponse:
    status = up.status
    if status < 200:
        # aiohttp hands back only a 101 as final (100/102/103 are skipped). The gateway never
        # forwards Upgrade, so a 101 is unsolicited: relayed, a front proxy would turn the client
        # connection into a tunnel while the gateway goes on reading it as HTTP (desync).
        up.close()
        log.warning("upstream answered %d to a request without Upgrade (request %s)", status, ctx.request_id)
        raise UpstreamError(Problem(UPSTREAM_UNAVAILABLE, internal_reason="upstream_unsolicited_upgrade"))
    hdrs = response_headers(up.headers, ctx, guarded_cookies)
    clen = up.content_length
    no_body = request.method == "HEAD" or status in _NO_BODY_STATUS
    if not no_body and clen is not None and clen <= SMALL_BODY:
        try:
            body = await up.read()
        except Exception as e:
            raise UpstreamError(_problem_for(e, "response")) from None
        if state.too_large:
            raise BodyTooLarge()
        ctx.status = status
        ctx.bytes_out = len(body)
        return web.Response(status=status, reason=up.reason, body=body, headers=hdrs)
    if no_body and clen is not None:
        hdrs["Content-Length"] = str(clen)
    elif clen is not None:
        hdrs["Content-Length"] = str(clen)
    resp = web.StreamResponse(status=status, reason=up.reason, headers=hdrs)
    ctx.status = status
    await resp.prepare(request)
    if no_body:
        await resp.write_eof()
        return resp
    n = 0
    try:
        # Bytes are forwarded as they arrive (read(n) returns what is there: Server-Sent Events
        # are not held back), in pieces of at most STREAM_CHUNK: with iter_any() a stalled
        # client's stream held whole 256 KiB socket reads, plain and encrypted (RSS per stalled
        # TLS stream ~3.4 MiB before, ~1 MiB after; see tests/e2e/test_edge_bounds.py).
        # After each piece, wait until the client's transport is below its high-water mark
        # (gateway/edge.py: 64 KiB) before reading the next one from the upstream: aiohttp's own
        # write() checks only every 64 KiB written.
        writer = request.writer
        async for chunk in up.content.iter_chunked(STREAM_CHUNK):
            n += len(chunk)
            await resp.write(chunk)
            await writer.drain()
    except (aiohttp.ClientError, TimeoutError) as e:
        # Headers are gone already: the only honest signal left is an aborted response.
        ctx.bytes_out = n
        ctx.reason = "upstream_aborted"
        log.warning(
            "upstream response aborted after %d bytes (request %s): %s", n, ctx.request_id, type(e).__name__
        )
        if request.transport is not None:
            request.transport.abort()
        return resp
    ctx.bytes_out = n
    await resp.write_eof()
    return resp
