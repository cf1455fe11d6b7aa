"""W3C Trace Context (``traceparent`` / ``tracestate``) through the gateway.

Per request (``tracing.propagate: true``, the default): a ``traceparent`` from a peer the config
trusts (``tracing.accept_from: trusted_proxies`` (default) | ``any`` | ``none``) is continued (same
trace id and flags, the gateway's own span id as the new parent, ``tracestate`` passed on as is
when it is well-formed); from anyone else, or malformed, a new trace is started and the client's
copies are dropped. The upstream receives the gateway's ``traceparent``; the trace id goes to
the access log, the audit record and every application log event of the request.

OpenTelemetry: not built in. The ids are the W3C ones, so an OpenTelemetry collector or a
tracing sidecar joins the gateway's hop to the upstream's spans by trace id; exporting spans
from the gateway itself (OTLP) is not implemented yet.
"""

from __future__ import annotations

import random
import re
from typing import Any

from pydantic import Field

from gateway.configbase import Model

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][_0-9a-z\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_getrandbits = random.getrandbits


class TracingConfig(Model):
    propagate: bool = Field(True, description="Send a W3C traceparent upstream (continued or new)")
    accept_from: str = Field(
        "trusted_proxies",
        description="Whose traceparent/tracestate is continued: trusted_proxies | any | none (others start a new trace)",
        pattern=r"^(trusted_proxies|any|none)$",
    )


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid version-00 (or later, read as 00) header, else None."""
    if not value or len(value) > 512:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags


def valid_tracestate(value: str | None) -> str | None:
    """The header when every list member is well-formed and there are at most 32, else None."""
    if not value or len(value) > 512:
        return None
    members = [m.strip() for m in value.split(",") if m.strip()]
    if not members or len(members) > 32 or not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return None
    return ",".join(members)


def new_trace_id() -> str:
    return "%032x" % (_getrandbits(128) or 1)


def new_span_id() -> str:
    return "%016x" % (_getrandbits(64) or 1)


def start(headers: Any, trusted: bool, cfg: TracingConfig | None) -> tuple[str, str, str, str | None]:
    """(trace id, the gateway's span id, flags, tracestate to forward) for one request."""
    accept = cfg.accept_from if cfg is not None else "trusted_proxies"
    if accept == "any" or (accept == "trusted_proxies" and trusted):
        parsed = parse_traceparent(headers.get("traceparent"))
        if parsed is not None:
            return parsed[0], new_span_id(), parsed[2], valid_tracestate(headers.get("tracestate"))
    return new_trace_id(), new_span_id(), "01", None  # a new trace: sampled, for the upstream to record
