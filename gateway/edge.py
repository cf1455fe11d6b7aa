"""The client side of the edge: every phase bounded, overload refused, bodies on bodiless methods.

One ``EdgeLimits`` per gateway process holds the ``server.*`` bounds (updated on reload) and runs
one sweep over the listener's connections (every ``interval`` seconds, not a timer per request):

- ``request_headers_timeout_seconds``: a connection that started a request (first byte while
  waiting for one) and has not completed its headers gets a 408 ``request_timeout`` problem and
  is closed (Envoy ``request_headers_timeout``). aiohttp's own keep-alive timeout bounds a
  connection that sends nothing, and the start of a request that arrived in the same read as a
  complete one (aiohttp's C parser does not show that it holds a partial request).
- ``request_body_timeout_seconds``: while the gateway waits for body bytes (the request's
  buffer is empty, the body not complete) and none arrive for this long, the body stream fails
  with ``BodyTimeout``; the request ends with 408 ``request_timeout`` and the connection is
  closed (nginx ``client_body_timeout``). A body the gateway does not read because the upstream
  is slow to take it is not the client's silence: that buffer is not empty.
- ``response_write_timeout_seconds``: response bytes waiting in the connection's write buffer
  that make no progress for this long (the client does not read) abort the connection; the
  request handler is cancelled with it, and the upstream response, not read to its end, closes
  its upstream connection (nginx ``send_timeout``). Flow control does the rest: aiohttp's
  ``StreamResponse.write`` waits for the transport to drain, and the upstream reader pauses its
  socket when its buffer is full, so a slow client holds at most a few buffers, never the body.
- ``tls_handshake_timeout_seconds``: passed to ``loop.create_server`` (``EdgeTCPSite``).
- ``max_connections``: a connection beyond the cap gets a 503 ``overloaded`` problem with
  ``Retry-After`` and is closed; ``max_concurrent_requests``: a request beyond it gets the same
  503 (``Gateway._serve``). Both counted in ``portvakt_overload_rejections_total{limit}``.

The handler subclass reads aiohttp's ``RequestHandler`` state (``_waiter``, ``_messages``) and a
request stream's buffer size (``_size``): aiohttp is pinned to 3.14 (see gateway/upstream_conn.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aiohttp import web, web_protocol

from gateway import metrics, problems
from gateway.problems import Problem

log = logging.getLogger("portvakt.edge")

OVERLOADED = problems.register("overloaded", 503, "Gateway overloaded")
REQUEST_TIMEOUT = problems.register("request_timeout", 408, "Request not received in time")
BODY_NOT_ALLOWED = problems.register("body_not_allowed", 400, "This method takes no request body")

# Methods whose request content has no generally defined semantics (RFC 9110 9.3.1, 9.3.2,
# 9.3.5, 9.3.7): a backend may ignore the framing and read the body as the next request (CL.0).
BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
WRITE_BUFFER_HIGH = 65536


class BodyTimeout(ConnectionError, TimeoutError):
    """The client stopped sending its request body (``request_body_timeout_seconds``).

    A ``ConnectionError`` for the body readers (the request ends with 408); a ``TimeoutError``
    for aiohttp, whose lingering read of an unread body after the response ignores timeouts
    quietly instead of logging the exception as unhandled."""


def _raw_problem(problem: Problem) -> bytes:
    """A complete HTTP/1.1 response with ``Connection: close``, for a connection that has no
    request object (refused at accept, headers never completed)."""
    rid = uuid.uuid4().hex
    body = problem.body(rid)
    head = [
        f"HTTP/1.1 {problem.status} {problem.title}",
        f"Content-Type: {problems.CONTENT_TYPE}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "Server: portvakt",
        f"X-Request-Id: {rid}",
    ]
    head += [f"{k}: {v}" for k, v in problem.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class EdgeLimits:
    """The edge bounds of one gateway process and the sweep that enforces the timeouts."""

    def __init__(self, server_config: Any):
        self.connections = 0
        self.configure(server_config)

    def configure(self, sc: Any) -> None:
        self.headers_timeout = sc.request_headers_timeout_seconds
        self.body_timeout = sc.request_body_timeout_seconds
        self.body_min_rate = sc.request_body_min_rate_bytes_per_second
        self.write_timeout = sc.response_write_timeout_seconds
        self.tls_handshake_timeout = sc.tls_handshake_timeout_seconds
        self.max_connections = sc.max_connections
        self.max_requests = sc.max_concurrent_requests
        self.retry_after = str(sc.overload_retry_after_seconds)
        self.body_policy = sc.body_on_bodiless_methods
        self.interval = max(
            0.05, min(1.0, self.headers_timeout / 4, self.body_timeout / 4, self.write_timeout / 4)
        )

    def overloaded(self, limit: str) -> Problem:
        """The 503 for ``limit`` (connections, requests, upstream_pool), counted."""
        metrics.OVERLOAD.labels(limit).inc()
        return Problem(
            OVERLOADED,
            detail="Try again shortly",
            headers={"Retry-After": self.retry_after},
            internal_reason=f"overloaded_{limit}",
        )

    def body_problem(self, request: web.BaseRequest) -> Problem | None:
        """The refusal for a body on a bodiless method, or None when it may go on. ``forward``
        mode takes only an exact Content-Length (a chunked body is what a CL.0 backend reads as
        the next request)."""
        if request.method not in BODILESS_METHODS:
            return None
        chunked = "Transfer-Encoding" in request.headers
        if not chunked and not request.content_length:
            return None  # no body (or Content-Length: 0)
        if self.body_policy == "forward" and not chunked:
            return None
        return Problem(
            BODY_NOT_ALLOWED,
            detail=f"{request.method} requests take no body here",
            internal_reason="body_not_allowed_chunked" if chunked else "body_not_allowed",
        )

    # -- the sweep ---------------------------------------------------------------------------------

    async def run(self, server: web.Server) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for h in server.connections:
                try:
                    self._check(h, now)
                except Exception:  # never let one connection stop the sweep
                    log.exception("edge sweep failed on a connection")

    def _check(self, h: Any, now: float) -> None:
        t = h.transport
        if t is None or not isinstance(h, EdgeRequestHandler):
            return
        started = h.msg_started
        if started is not None and now - started > self.headers_timeout:
            h.msg_started = None
            metrics.TIMEOUTS.labels("request_headers").inc()
            t.write(
                _raw_problem(
                    Problem(
                        REQUEST_TIMEOUT,
                        detail="Request headers not received in time",
                        internal_reason="request_headers_timeout",
                    )
                )
            )
            h.force_close()
            return
        r = h.body_request
        if r is not None:
            c = r.content
            if not c.is_eof() and getattr(c, "_size", 1) == 0 and c.exception() is None:
                # Waiting for the client: silent too long, or trickling below the minimum rate
                # once the grace period (the silence bound) is over. Without the rate, one byte
                # every 29 s held a request slot for as long as the client liked (red team 2, F04).
                elapsed = now - h.body_started
                if now - h.last_rx > self.body_timeout or (
                    self.body_min_rate > 0
                    and elapsed > self.body_timeout
                    and c.total_bytes < self.body_min_rate * elapsed
                ):
                    metrics.TIMEOUTS.labels("request_body").inc()
                    h.timeout_reason = "request_body_timeout"
                    c.set_exception(BodyTimeout())
        size = t.get_write_buffer_size()
        if size == 0:
            h.write_stalled_since = None
            return
        if h.write_stalled_since is None or size < h.write_buffered:
            h.write_stalled_since = now  # first seen, or the client read some: progress
        h.write_buffered = size
        if now - h.write_stalled_since > self.write_timeout:
            metrics.TIMEOUTS.labels("response_write").inc()
            h.timeout_reason = "response_write_timeout"
            h.write_stalled_since = None
            t.abort()


class EdgeRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the state the edge sweep reads, and the connection cap."""

    edge: EdgeLimits | None = None
    counted = False
    last_rx = 0.0
    msg_started: float | None = None  # first byte of a request whose headers are not complete
    body_request: web.BaseRequest | None = None  # set while its body may still be awaited
    body_started = 0.0  # when the gateway started waiting for that body
    timeout_reason: str | None = None
    write_stalled_since: float | None = None
    write_buffered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        edge = getattr(self._manager, "edge", None)
        if edge is None:
            return
        # Write flow control at 64 KiB (TLS transports default to 512 KiB): a client that does
        # not read holds that much of the response here, not more.
        try:
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):  # pragma: no cover - not a flow-controlled transport
            pass
        self.edge = edge
        self.counted = True
        self.last_rx = time.monotonic()
        edge.connections += 1
        if edge.connections > edge.max_connections and not self._evict_idle():
            problem = edge.overloaded("connections")
            transport.write(_raw_problem(problem))  # type: ignore[attr-defined]
            self.force_close()

    def watch_body(self, request: web.BaseRequest) -> None:
        """The request whose body the gateway may now wait for (the edge sweep bounds it)."""
        self.body_request = request
        self.body_started = time.monotonic()

    def _evict_idle(self) -> bool:
        """At the connection cap, close the longest-idle keep-alive connection (one waiting for its
        next request, nothing of a request received) to make room for this one: idle connections
        held open by one client must not keep everyone else out (red team 2, F04)."""
        idle = [
            h
            for h in getattr(self._manager, "connections", ())
            if h is not self
            and isinstance(h, EdgeRequestHandler)
            and h._waiter is not None
            and h.msg_started is None
            and h.transport is not None
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda h: h.last_rx)
        metrics.OVERLOAD.labels("idle_connection_closed").inc()
        oldest.force_close()  # closes its transport (aiohttp's RequestHandler.force_close)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.counted:
            self.counted = False
            self.edge.connections -= 1  # type: ignore[union-attr]
        self.body_request = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not data:
            super().data_received(data)
            return
        now = self.last_rx = time.monotonic()
        super().data_received(data)
        if self._messages:
            self.msg_started = None  # a request's headers are complete
        elif self.msg_started is None:
            # Bytes that completed no request: the start of one, unless they are the body of the
            # request being handled (pipelined bytes after a complete body start the next one).
            current = self._current_request
            if self._waiter is not None or current is None or current.content.is_eof():
                self.msg_started = now


class EdgeTCPSite(web.TCPSite):
    """``web.TCPSite`` that passes a TLS handshake timeout to ``loop.create_server``."""

    def __init__(self, *args: Any, ssl_handshake_timeout: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ssl_handshake_timeout = ssl_handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        extra: dict[str, Any] = {}
        if self._ssl_context is not None and self.ssl_handshake_timeout is not None:
            extra["ssl_handshake_timeout"] = self.ssl_handshake_timeout
        self._server = await loop.create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            **extra,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port
