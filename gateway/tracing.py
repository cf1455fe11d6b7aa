"""W3C Trace Context (``traceparent`` / ``tracestate``) through the gateway, and OpenTelemetry spans.

Per request (``tracing.propagate: true``, the default): a ``traceparent`` from a peer the config
trusts (``tracing.accept_from: trusted_proxies`` (default) | ``any`` | ``none``) is continued (same
trace id and flags, the gateway's own span id as the new parent, ``tracestate`` passed on as is
when it is well-formed); from anyone else, or malformed, a new trace is started and the client's
copies are dropped. The upstream receives the gateway's ``traceparent``; the trace id goes to
the access log, the audit record and every application log event of the request.

OpenTelemetry (``tracing.otlp``, off by default): spans exported over OTLP/HTTP by the SDK, an
optional extra (``pip install 'portvakt[otel]'``). The SDK is imported only when the section is
set (``gateway/otel.py``); a config that sets it without the extra installed is a config error.
With it on, the ids above are the server span's (same rules for the parent), the flags carry the
sampling decision, each policy stage gets a span and the upstream call a client span, whose id is
the upstream's parent. With it off the request path pays an attribute check (``ctx.otel is None``)
where spans would be recorded, and nothing else.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from gateway import metrics
from gateway.configbase import Model

if TYPE_CHECKING:  # pragma: no cover
    from gateway.chain import BuildEnv
    from gateway.config import Config

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TRACESTATE_MEMBER = re.compile(
    r"[a-z0-9][_0-9a-z\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_getrandbits = random.getrandbits


class OtlpConfig(Model):
    endpoint: str = Field(
        description="OTLP/HTTP traces endpoint, the full URL (e.g. http://otel-collector:4318/v1/traces)"
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers sent with each export (a collector's API key: use ${ENV_VAR}); never logged",
    )
    timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=60,
        description="Longest one export request may take (the exporter thread waits, never a request)",
    )
    ca_file: str | None = Field(None, description="CA bundle for an https endpoint (default: the system's)")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded; a continued trace follows its parent's sampled flag",
    )
    service_name: str = Field("portvakt", min_length=1, max_length=100, description="Resource service.name")
    queue_size: int = Field(
        2048,
        ge=1,
        le=1_000_000,
        description="Spans waiting for export; beyond it spans are dropped and counted",
    )
    batch_size: int = Field(512, ge=1, le=100_000, description="Spans per export request")
    export_interval_seconds: float = Field(
        5.0, gt=0, le=300, description="Longest a finished span waits before its batch is exported"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#@]+(/[^\s?#]*)?\Z", v):
            raise ValueError("must be an http:// or https:// URL without credentials, query or fragment")
        return v


class TracingConfig(Model):
    propagate: bool = Field(True, description="Send a W3C traceparent upstream (continued or new)")
    accept_from: str = Field(
        "trusted_proxies",
        description="Whose traceparent/tracestate is continued: trusted_proxies | any | none (others start a new trace)",
        pattern=r"^(trusted_proxies|any|none)$",
    )
    otlp: OtlpConfig | None = Field(
        None, description="Export OpenTelemetry spans over OTLP/HTTP (needs the otel extra); unset: off"
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


def incoming(
    headers: Any, trusted: bool, cfg: TracingConfig | None
) -> tuple[str, str, str, str | None] | None:
    """(trace id, parent span id, flags, tracestate) of the trace this request continues: the
    peer's valid ``traceparent`` when ``accept_from`` lets this peer start it, else None."""
    accept = cfg.accept_from if cfg is not None else "trusted_proxies"
    if accept == "any" or (accept == "trusted_proxies" and trusted):
        parsed = parse_traceparent(headers.get("traceparent"))
        if parsed is not None:
            return parsed[0], parsed[1], parsed[2], valid_tracestate(headers.get("tracestate"))
    return None


def start(headers: Any, trusted: bool, cfg: TracingConfig | None) -> tuple[str, str, str, str | None]:
    """(trace id, the gateway's span id, flags, tracestate to forward) for one request."""
    parent = incoming(headers, trusted, cfg)
    if parent is not None:
        return parent[0], new_span_id(), parent[2], parent[3]
    return new_trace_id(), new_span_id(), "01", None  # a new trace: sampled, for the upstream to record


# ---- OpenTelemetry (optional) ------------------------------------------------------------------

SPANS_EXPORTED = metrics.Counter(
    "portvakt_otel_spans_exported_total",
    "Spans the OTLP collector accepted (tracing.otlp)",
    registry=metrics.REGISTRY,
)
SPANS_DROPPED = metrics.Counter(
    "portvakt_otel_spans_dropped_total",
    "Spans not exported (queue_full: the export queue was full; export_failed: the collector "
    "refused or could not be reached); requests are never affected",
    ["reason"],
    registry=metrics.REGISTRY,
)
for _reason in ("queue_full", "export_failed"):
    SPANS_DROPPED.labels(_reason)

OTEL_MISSING = (
    "needs the OpenTelemetry SDK, which is not installed: pip install 'portvakt[otel]' "
    "(opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)"
)


def otel_missing() -> str | None:
    """Why the OpenTelemetry SDK and OTLP/HTTP exporter cannot be imported, or None when they can."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        return f"{OTEL_MISSING} ({e})"
    return None


def config_problems(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-checks of ``tracing:`` (gateway.config runs them at load and in check-config)."""
    t = cfg.tracing
    if t.otlp is None:
        return []
    errs: list[tuple[tuple[Any, ...], str]] = []
    missing = otel_missing()
    if missing is not None:
        errs.append((("tracing", "otlp"), missing))
    return errs


def build_otel(env: BuildEnv) -> Any:
    """The runtime component exporting spans (gateway.otel.Otel), or None when ``tracing.otlp``
    is unset: then nothing of OpenTelemetry is imported."""
    otlp = env.config.tracing.otlp
    if otlp is None:
        return None
    from gateway.otel import Otel  # the SDK: present, config_problems made sure of it

    return Otel(env.config, otlp, env.base_dir)
