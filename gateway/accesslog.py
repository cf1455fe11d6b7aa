"""One structured JSON access-log line per request (stdout, or the ``portvakt.access`` logger).

Fields: time, request_id, client_ip, route, method, path (no query string), status, decision,
reason, duration_ms, upstream_ms, bytes_in, bytes_out, and detections when a stage in detect
mode would have denied (documented in docs/logging.md). Never headers, tokens, passwords or the
query string; every possible person number in the path (``norid.mask_person_numbers``, the
same function the audit log and error paths use) is masked with ``*``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from gateway.norid import mask_person_numbers

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.access")

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_enc = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def mask_path(path: str) -> str:
    """The path with every possible person number (``norid.mask_person_numbers``: 11 digits,
    6+5 with a space, dash or dot, embedded in longer digit runs) replaced by as many ``*``."""
    return mask_person_numbers(path)


class PersonNumberRedactor(logging.Filter):
    """Masks possible person numbers in a log line and its traceback (error paths: an exception
    message may quote a path or a header value)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave the record as it is
            return True
        masked = mask_person_numbers(msg)
        if masked is not msg and masked != msg:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_person_numbers(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_person_numbers(record.exc_text)
        return True


def install_log_redactor(logger: logging.Logger | None = None) -> None:
    """Put ``PersonNumberRedactor`` on every handler of ``logger`` (default: the root logger)."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, PersonNumberRedactor) for f in h.filters):
            h.addFilter(PersonNumberRedactor())


_IP_TEXT_MAX = 4096
_ip_texts: dict[int, tuple[Any, str]] = {}


def ip_text(ip: Any) -> str:
    """``str(ip)`` (about 2 µs for an ipaddress object), memoised by identity: the server's
    ``parse_ip`` cache hands out the same object for the same address. Bounded (cleared when
    full); each entry holds its object, so an id cannot be reused while it is cached."""
    hit = _ip_texts.get(id(ip))
    if hit is not None and hit[0] is ip:
        return hit[1]
    if len(_ip_texts) >= _IP_TEXT_MAX:
        _ip_texts.clear()
    text = str(ip)
    _ip_texts[id(ip)] = (ip, text)
    return text


_sec_cache: list = [-1, ""]


def _iso(t: float) -> str:
    sec = int(t)
    if sec != _sec_cache[0]:  # strftime once per second, not once per request
        _sec_cache[0], _sec_cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_sec_cache[1]}.{int((t - sec) * 1000):03d}Z"


class BatchWriter:
    """Writes access lines in one ``write`` + ``flush`` per event-loop iteration instead of one
    per request (the lines of requests finishing in the same tick go out together). Outside a
    running loop it writes at once."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.pending: list[str] = []

    def __call__(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not break request handling


_direct: BatchWriter | None = None


def _client_ip_text(ctx: RequestContext) -> str:
    return ip_text(ctx.client_ip)


def record(ctx: RequestContext, duration: float) -> None:
    """Write the access-log line for a finished request."""
    if _direct is None and not log.isEnabledFor(logging.INFO):
        return
    # Hand-assembled (every string through the C JSON string encoder): about a third of
    # json.dumps on a dict, and this runs once per request.
    up = ctx.upstream_duration
    route = ctx.route
    reason = ctx.reason
    line = (
        f'{{"time":"{_iso(ctx.started_wall)}","request_id":{_enc(ctx.request_id)},'
        f'"client_ip":"{_client_ip_text(ctx)}","route":{_enc(route.name) if route is not None else "null"},'
        f'"method":{_enc(ctx.method)},"path":{_enc(mask_path(ctx.path))},"status":{int(ctx.status)},'
        f'"decision":{_enc(ctx.decision)},"reason":{_enc(reason) if reason is not None else "null"},'
        f'"duration_ms":{duration * 1000:.3f},"upstream_ms":{f"{up * 1000:.3f}" if up is not None else "null"},'
        f'"bytes_in":{int(ctx.bytes_in)},"bytes_out":{int(ctx.bytes_out)}'
    )
    if ctx.trace_id is not None:
        line += f',"trace_id":"{ctx.trace_id}"'
    if ctx.detections:
        line += ',"detections":' + _dumps([f"{d.filter}:{d.reason}" for d in ctx.detections])
    line += "}"
    if _direct is not None:
        _direct(line)
    else:
        log.info(line)


def configure(stream: Any = None) -> None:
    """Access lines go to stdout as bare JSON, one per line, written in batches per event-loop
    iteration (bypassing the logging machinery, which costs more than the rest of the line).
    Without ``configure`` (library use, tests) lines go to the ``portvakt.access`` logger."""
    global _direct
    _direct = BatchWriter(stream or sys.stdout)
    log.propagate = False
    install_log_redactor()


def unconfigure() -> None:
    """Back to the ``portvakt.access`` logger (``logging.access_log: logging | off``)."""
    global _direct
    if _direct is not None:
        _direct.flush()
    _direct = None
