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

This touches aiohttp internals (``BaseConnector._factory``, ``_get``, ``_release``): pinned to
aiohttp 3.14 in pyproject.toml; ``tests/gateway/test_upstream_conn.py`` fails if they change.
"""

from __future__ import annotations

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


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol with an idle guard: bytes received while idle close it."""

    idle = False
    sent_body = False  # the current request carried a body
    quiet_poll: Any = None  # a poll object on this connection's socket (None: not a socket transport)

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
        self._factory = functools.partial(GuardedResponseHandler, loop=self._loop)

    async def connect(self, req: Any, traces: list[Any], timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
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
            proto = conn.protocol
            proto.idle = False
            if not proto.should_close and _socket_is_quiet(proto):
                return conn
            metrics.UPSTREAM_DISCARDED.labels("dirty_on_reuse").inc()
            conn.close()  # closes the transport; try the next pooled one
