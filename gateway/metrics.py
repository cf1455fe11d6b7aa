"""Prometheus metrics, all named ``portvakt_*``, all with bounded label sets.

Labels are route, method, status, filter, decision, reason, result: never an org number, a
person, a path or a token. Stages that need their own series declare them here or in their module
against ``REGISTRY`` (so tests and the admin endpoint see one registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from gateway import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FILTER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)

BUILD_INFO = Info("portvakt_build", "Portvakt build information", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

REQUESTS = Counter(
    "portvakt_requests_total",
    "Requests handled, by route, method, status and decision",
    ["route", "method", "status", "decision"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "portvakt_request_duration_seconds",
    "Time from request start to response start, by route",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_DURATION = Histogram(
    "portvakt_upstream_duration_seconds",
    "Time waiting for the upstream's response headers, by upstream",
    ["upstream"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
# multiprocess_mode only matters under --workers N (prometheus multiprocess mode, see
# gateway/supervisor.py): in-flight is summed over live workers, the last reload is the latest.
IN_FLIGHT = Gauge(
    "portvakt_requests_in_flight", "Requests being handled now", registry=REGISTRY, multiprocess_mode="livesum"
)
FILTER_DECISIONS = Counter(
    "portvakt_filter_decisions_total",
    "Policy stage decisions by filter, decision (allow, skip, deny, detect) and reason",
    ["filter", "decision", "reason"],
    registry=REGISTRY,
)
FILTER_DURATION = Histogram(
    "portvakt_filter_duration_seconds",
    "Time spent in each policy stage",
    ["filter"],
    buckets=FILTER_BUCKETS,
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "portvakt_config_reloads_total", "Config reloads by result", ["result"], registry=REGISTRY
)
CONFIG_LAST_SUCCESS = Gauge(
    "portvakt_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful config load",
    registry=REGISTRY,
    multiprocess_mode="max",
)

_filter_children: dict[tuple[str, str, str], object] = {}
_filter_hist_children: dict[str, object] = {}


def observe_filter(name: str, decision: str, reason: str, seconds: float) -> None:
    """Count one filter decision and its duration (label children cached: no per-call lookup)."""
    key = (name, decision, reason)
    c = _filter_children.get(key)
    if c is None:
        c = _filter_children[key] = FILTER_DECISIONS.labels(name, decision, reason)
    c.inc()  # type: ignore[attr-defined]
    h = _filter_hist_children.get(name)
    if h is None:
        h = _filter_hist_children[name] = FILTER_DURATION.labels(name)
    h.observe(seconds)  # type: ignore[attr-defined]
