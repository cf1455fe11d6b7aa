"""Upstream connection hygiene: a pooled connection is reused only after a clean exchange.

aiohttp's connector reuses a pooled keep-alive connection when its transport is open. Bytes the
upstream writes while the connection sits idle in the pool (a late or unsolicited response, the
answer to a request smuggled in a body the upstream did not read) are parsed into the
connection's queue and handed to the *next* request on it: another client's answer. This
module closes that hole in one place:

- ``GuardedResponseHandler``: a connection marked idle (in the pool) that receives any byte is
  closed at once (the bytes are dropped, the count goes to
  ``portvakt_upstream_connections_discarded_total{reason="unsolicited_bytes"}``).
- ``GuardedConnector``: marks a protocol idle when aiohttp puts it back in the pool, and before
  handing a pooled connection out again re-checks it: nothing queued (``should_close``: queued
  messages, unfinished payload, a parser error) and nothing waiting in the socket (a zero-timeout
  ``poll`` on it, which closes the gap between bytes that have arrived in the kernel and the
  event loop delivering them, and sees a FIN or a socket error too). A dirty connection is
  closed, never reused.
- aiohttp itself closes a connection whose request body was not completely sent (its
  ``write_bytes`` closes the connection on cancellation or error) and one whose response was
  not read to the end (``should_close``: payload not at EOF).

What stays outside any HTTP/1.1 proxy's reach: bytes the upstream sends *after* the gateway has
written the next request on the connection cannot be told apart from that request's answer.
The defence for the smuggled-body case is therefore that a body nobody defined semantics for is
not forwarded by default (``server.body_on_bodiless_methods``, see README), and a forwarded one
goes with ``Connection: close`` on a connection that is closed after its exchange, as is one
that carried a body and got an error answer (often given before the body was read).

The same protocol also keeps ``sock_read`` (the upstream's silence while a response is read)
cheaper: aiohttp re-arms a loop timer on every read (cancel one, schedule one: three timer
operations for a small response); here a read only writes its deadline on the connection, and
``ReadDeadlines`` keeps one timer per connector, armed for the earliest deadline and, when it
fires, re-armed for the earliest still pending (deadlines only move later, so that is rarely
more than once per ``sock_read`` period). An expired connection fails exactly as aiohttp's own
timer would fail it (``_on_read_timeout``: ``SocketTimeoutError`` on the response).

This touches aiohttp internals (``BaseConnector._factory``, ``_get``, ``_release``,
``ResponseHandler._reschedule_timeout``/``_drop_timeout``/``_on_read_timeout``): pinned to
aiohttp 3.14 in pyproject.toml; ``tests/gateway/test_upstream_conn.py`` fails if they change.
"""

from __future__ import annotations

import asyncio
import functools
import select
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from gateway import metrics

_READABLE = select.POLLIN | select.POLLPRI  # POLLHUP and POLLERR are always reported
# Bytes one recv() on an upstream socket may return (asyncio's socket transport reads 256 KiB at a
# time): what a paused upstream stream can hold beyond its StreamReader's high-water mark.
UPSTREAM_RECV_BYTES = 65536


class ReadDeadlines:
    """``sock_read`` of every connection of one connector with one loop timer (see the module
    docstring). A connection is in ``waiting`` while its read deadline runs."""

    __slots__ = ("loop", "waiting", "handle", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: set[GuardedResponseHandler] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.when = 0.0

    def watch(self, proto: GuardedResponseHandler, deadline: float) -> None:
        self.waiting.add(proto)
        if self.handle is None or deadline < self.when:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.when = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        # Timers fire with millisecond granularity: a deadline within that is due now.
        now = self.loop.time() + 0.001
        due = [p for p in self.waiting if p.read_deadline is not None and p.read_deadline <= now]
        for p in due:
            self.waiting.discard(p)
            p.read_deadline = None
            p._on_read_timeout()  # as aiohttp's own timer: the response fails with SocketTimeoutError
        pending = [p.read_deadline for p in self.waiting if p.read_deadline is not None]
        if pending:
            self._arm(min(pending))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.waiting.clear()


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol with an idle guard (bytes received while idle close it) and
    ``sock_read`` kept by its connector's ``ReadDeadlines``."""

    idle = False
    sent_body = False  # the current request carried a body
    quiet_poll: Any = None  # a poll object on this connection's socket (None: not a socket transport)
    read_deadline: float | None = None
    read_deadlines: ReadDeadlines | None = None

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        deadlines = self.read_deadlines
        if deadlines is None:  # made outside a GuardedConnector: aiohttp's own timer
            super()._reschedule_timeout()
            return
        if timeout:
            self.read_deadline = deadline = self._loop.time() + timeout
            if self not in deadlines.waiting:
                deadlines.watch(self, deadline)
        elif self.read_deadline is not None:
            self._drop_timeout()

    def _drop_timeout(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline = None
            deadlines = self.read_deadlines
            if deadlines is not None:
                deadlines.waiting.discard(self)
        super()._drop_timeout()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if isinstance(getattr(transport, "max_size", None), int):  # a plain socket transport
            transport.max_size = UPSTREAM_RECV_BYTES
        sock = transport.get_extra_info("socket")
        if sock is not None:
            poller = select.poll()
            poller.register(sock.fileno(), _READABLE)
            self.quiet_poll = poller

    def data_received(self, data: bytes) -> None:
        if self.idle and data:
            self.idle = False
            self._should_close = True
            metrics.UPSTREAM_DISCARDED.labels("unsolicited_bytes").inc()
            transport = self.transport
            if transport is not None:
                transport.close()
            return
        super().data_received(data)
        # An error answer to a request with a body is often given before the body was read
        # (401, 413); a backend that then reads the body as a request answers it on this
        # connection. Decided here, when the answer is parsed: the connection is released to the
        # pool as soon as a short answer is read, before the caller sees it.
        if (
            self.sent_body and self._buffer and self._buffer[-1][0][0].code >= 400
        ):  # ((message, payload), size)
            self._should_close = True


def _socket_is_quiet(proto: ResponseHandler) -> bool:
    """True when nothing is waiting in the connection's socket: no byte, no FIN, no error. One
    ``poll`` with a zero timeout on a poll object made when the connection was (about half the
    cost of the ``FIONREAD`` ioctl it replaces, and a FIN is seen too: such a connection would
    only fail the request that took it)."""
    transport = proto.transport
    if transport is None or transport.is_closing():
        return False
    poller = getattr(proto, "quiet_poll", None)
    if poller is None:
        return True  # not a socket transport: the idle guard still applies
    try:
        return not poller.poll(0)
    except OSError:
        return False


class GuardedConnector(aiohttp.TCPConnector):
    """``TCPConnector`` whose pooled connections are guarded (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_deadlines = ReadDeadlines(self._loop)
        self._factory = functools.partial(self._make_protocol, loop=self._loop)  # type: ignore[assignment]

    def _make_protocol(self, loop: asyncio.AbstractEventLoop) -> GuardedResponseHandler:
        proto = GuardedResponseHandler(loop=loop)
        proto.read_deadlines = self.read_deadlines
        return proto

    async def close(self, *args: Any, **kwargs: Any) -> Any:
        self.read_deadlines.close()
        return await super().close(*args, **kwargs)

    async def connect(self, req: Any, traces: list[Any], timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        proto: Any = conn.protocol  # a GuardedResponseHandler: this connector's _factory makes them
        if proto is not None:
            h = req.headers
            proto.sent_body = h.get("Content-Length", "0") != "0" or "Transfer-Encoding" in h
            # A request that says Connection: close ends its connection (RFC 9112 9.6); aiohttp
            # would otherwise pool it. The gateway sends it when a body goes with a method that
            # has no body semantics, so a CL.0 backend's second answer reaches nobody.
            proto.one_shot = h.get("Connection", "").lower() == "close"
        return conn

    def _release(self, key: Any, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        should_close = should_close or getattr(protocol, "one_shot", False)
        super()._release(key, protocol, should_close=should_close)
        # Pooled (transport still open) -> idle from here: any byte now is unsolicited.
        if protocol.transport is not None and not self._closed:
            protocol.idle = True  # type: ignore[attr-defined]

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        while True:
            conn = await super()._get(key, traces)
            if conn is None:
                return None
            proto: Any = conn.protocol  # a pooled connection always has its GuardedResponseHandler
            proto.idle = False
            if not proto.should_close and _socket_is_quiet(proto):
                return conn
            metrics.UPSTREAM_DISCARDED.labels("dirty_on_reuse").inc()
            conn.close()  # closes the transport; try the next pooled one
