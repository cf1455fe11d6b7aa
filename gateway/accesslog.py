"""One structured JSON access-log line per request, on the ``portvakt.access`` logger.

Fields: time, request_id, client_ip, route, method, path (no query string), status, decision,
reason, duration_ms, upstream_ms, bytes_in, bytes_out. Never headers, tokens, passwords or the
query string; any run of 11 or more digits in the path (a fødselsnummer or D-number has 11) is
masked with ``*``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.access")

_ELEVEN = re.compile(r"\d{11,}")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def mask_path(path: str) -> str:
    """The path with every run of 11+ digits replaced by as many ``*``."""
    return _ELEVEN.sub(lambda m: "*" * len(m.group()), path)


def _iso(t: float) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def record(ctx: "RequestContext", duration: float) -> None:
    """Write the access-log line for a finished request."""
    if not log.isEnabledFor(logging.INFO):
        return
    up = ctx.upstream_duration
    line = {
        "time": _iso(ctx.started_wall),
        "request_id": ctx.request_id,
        "client_ip": str(ctx.client_ip),
        "route": ctx.route.name if ctx.route is not None else None,
        "method": ctx.method,
        "path": mask_path(ctx.path),
        "status": ctx.status,
        "decision": ctx.decision,
        "reason": ctx.reason,
        "duration_ms": round(duration * 1000, 3),
        "upstream_ms": round(up * 1000, 3) if up is not None else None,
        "bytes_in": ctx.bytes_in,
        "bytes_out": ctx.bytes_out,
    }
    if ctx.detections:
        line["detections"] = [f"{d.filter}:{d.reason}" for d in ctx.detections]
    log.info(_dumps(line))


def configure(stream=None) -> None:
    """Access lines go to stdout as bare JSON (one per line); idempotent."""
    if getattr(log, "_portvakt_configured", False):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    log._portvakt_configured = True  # type: ignore[attr-defined]
