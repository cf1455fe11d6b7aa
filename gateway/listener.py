"""aiohttp's listener, answering what its HTTP parser refuses as problem+json.

``ProblemServer`` makes one ``ProblemRequestHandler`` per connection (the edge's handler,
gateway/edge.py, with the parser's refusals turned into recorded problems and the chunk-size
guard of gateway/framing.py following the bytes); ``classify_parser_error`` names the precise
reason of a refusal.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)

from filters.ingress import HEADERS_TOO_LARGE, REQUEST_SMUGGLING, URI_TOO_LONG
from gateway import problems
from gateway.canonical import HOST_NOT_CANONICAL, PATH_NOT_CANONICAL
from gateway.edge import EdgeRequestHandler
from gateway.framing import ChunkGuard, ChunkSizeOutOfRange
from gateway.problems import Problem

if TYPE_CHECKING:
    from gateway.server import Gateway


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ProblemRequestHandler(EdgeRequestHandler):
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


class ProblemServer(web.Server):
    gateway: Gateway | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
