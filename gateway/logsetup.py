"""Application logs: ``logging.format: text | json``, one line per event, with the request id.

- ``text``: ``2026-12-07T18:41:42.123Z INFO portvakt.server [request_id] message``; a newline
  inside a message or a traceback is written as ``\\n`` so that every event is one line.
- ``json``: one object per line: ``time`` (UTC, ms), ``level``, ``logger``, ``message``,
  ``request_id`` (when the event happened while handling a request), ``exception`` (type and
  traceback, as one string) when there is one.

The request id comes from a context variable the server sets per request (each request runs in
its own task, so concurrent requests never see each other's id).

Access log (``logging.access_log``): ``stdout`` (default) writes the access JSON lines straight to
stdout, batched per event-loop tick (the cheapest); ``logging`` sends each line through the
``portvakt.access`` logger (then ``json`` format writes the access object itself as the line,
``text`` format prefixes it like any other event); ``off`` writes none.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import traceback
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("portvakt_request_id", default=None)
TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("portvakt_trace_id", default=None)

# --log-level / PORTVAKT_LOG_LEVEL: wins over logging.level from the config when set.
LEVEL_OVERRIDE: str | None = None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
            record.trace_id = TRACE_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        rid = getattr(record, "request_id", None)
        line = f"{_iso(record.created)} {record.levelname} {record.name}: "
        if rid:
            line += f"[{rid}] "
        line += msg
        if record.exc_info and record.exc_info[0] is not None:
            line += " | " + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            line += " | " + record.exc_text
        return line.replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name == "portvakt.access" and msg.startswith("{"):
            return msg  # already one JSON object with its own time and request_id
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": msg,
        }
        rid = getattr(record, "request_id", None)
        if rid:
            doc["request_id"] = rid
            tid = getattr(record, "trace_id", None)
            if tid:
                doc["trace_id"] = tid
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Portvakt's own handler on the root logger (replaced, never stacked, on reconfigure)."""


def configure(fmt: str = "text", level: str = "INFO", access_log: str = "stdout", stream: Any = None) -> None:
    """(Re)configure the root logger and the access log. Safe to call again on reload."""
    from gateway import accesslog

    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    # A bare handler someone else installed (logging.basicConfig before us) would print twice.
    for bare in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(bare)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, (LEVEL_OVERRIDE or level).upper(), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    access = logging.getLogger("portvakt.access")
    if access_log == "stdout":
        accesslog.configure()
    else:
        accesslog.unconfigure()
        access.propagate = True
        if access_log == "off":
            access.setLevel(logging.CRITICAL + 1)
        else:
            access.setLevel(logging.INFO)
            # Through stdout like the direct writer, in the configured format.
            for h in [h for h in access.handlers if isinstance(h, _Handler)]:
                access.removeHandler(h)
            out = _Handler(sys.stdout)
            out.setFormatter(handler.formatter)
            out.addFilter(_RequestIdFilter())
            access.addHandler(out)
            access.propagate = False


def apply(cfg: Any) -> None:
    """Apply a loaded config's ``logging:`` section."""
    lc = getattr(cfg, "logging", None)
    if lc is None:
        return
    configure(lc.format, lc.level, lc.access_log)
