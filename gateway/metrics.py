"""Prometheus metrics, all named ``portvakt_*``, all with bounded label sets.

Labels are route, method, status, filter, decision, reason, result: never an org number, a
person, a path or a token. Stages that need their own series declare them here or in their module
against ``REGISTRY`` (so tests and the admin endpoint see one registry).
"""

from __future__ import annotations

from typing import Any, Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import __version__

# No ``*_created`` series: they double the series count and nothing here reads them.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)


def add_process_collectors(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU, RSS, fds, start time), ``python_info`` and ``python_gc_*`` series of
    this process. Under ``--workers N`` the supervisor's registry has them (its own process)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


add_process_collectors(REGISTRY)
del GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR  # (the default registry's, unused here)

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
UPSTREAM_DISCARDED = Counter(
    "portvakt_upstream_connections_discarded_total",
    "Pooled upstream connections closed instead of reused (unsolicited_bytes: bytes arrived while "
    "idle; dirty_on_reuse: bytes queued or waiting when taken from the pool)",
    ["reason"],
    registry=REGISTRY,
)
OVERLOAD = Counter(
    "portvakt_overload_rejections_total",
    "Connections or requests refused by overload protection (connections, requests, upstream_pool; "
    "idle_connection_closed: an idle keep-alive connection closed to make room at the connection cap)",
    ["limit"],
    registry=REGISTRY,
)
TIMEOUTS = Counter(
    "portvakt_edge_timeouts_total",
    "Client-side phases that ran out of time (request_headers, request_body, response_write)",
    ["phase"],
    registry=REGISTRY,
)
# How the supervisor merges a gauge over workers under --workers N (gateway/workermetrics.py), by
# gauge name: "livesum"/"sum" summed, "max"/"livemax" the maximum, "min"/"livemin" the minimum; a
# gauge not listed gets one series per worker (a ``pid`` label).
GAUGE_MERGE: dict[str, str] = {}


GaugeMerge = Literal["livesum", "sum", "max", "livemax", "min", "livemin", "mostrecent", "livemostrecent"]


def merged_gauge(name: str, documentation: str, merge: GaugeMerge, **kwargs: Any) -> Gauge:
    """A gauge of ``REGISTRY`` that the supervisor merges over workers by ``merge``."""
    GAUGE_MERGE[name] = merge
    return Gauge(name, documentation, registry=REGISTRY, multiprocess_mode=merge, **kwargs)


# In-flight is summed over live workers, the last reload is the latest.
IN_FLIGHT = merged_gauge("portvakt_requests_in_flight", "Requests being handled now", "livesum")
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
for _result in ("success", "failure"):  # known label values: present before the first reload
    CONFIG_RELOADS.labels(_result)
CONFIG_LAST_SUCCESS = merged_gauge(
    "portvakt_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful config load",
    "max",
)
# 1 when the last load or reload succeeded, 0 when the last one was rejected (the running config
# is then older than the file). Under --workers: the lowest over live workers.
CONFIG_LAST_SUCCESSFUL = merged_gauge(
    "portvakt_config_last_reload_successful",
    "Whether the last config reload succeeded (1) or was rejected (0)",
    "livemin",
)


def init_route_series(route_names: Any, upstream_names: Any) -> None:
    """Create the per-route and per-upstream series with zero counts, so they exist (and rate()
    works) before the first request; called when a config is loaded."""
    for name in route_names:
        histogram_recorder(REQUEST_DURATION, name)
    for name in upstream_names:
        UPSTREAM_DURATION.labels(name)


# ---- the request path's recorders ----------------------------------------------------------
#
# The request path keeps the labelled children it records into (``.labels()`` looks the label
# values up and validates them on every call) and uses prometheus-client's public ``inc`` and
# ``observe`` on them.


def counter_value(child: Any) -> Any:
    """What the request path counts into for one labelled Counter child (``.inc(n)``)."""
    return child


_recorders: dict[tuple[Any, tuple[str, ...]], Any] = {}


def histogram_recorder(histogram: Histogram, *labels: str) -> Any:
    """The (cached) child ``histogram.labels(*labels)``; ``.observe(seconds)`` records."""
    key = (histogram, labels)
    r = _recorders.get(key)
    if r is None:
        r = _recorders[key] = histogram.labels(*labels)
    return r


_filter_children: dict[tuple[str, str, str], Any] = {}
_filter_hist_children: dict[str, Any] = {}


def observe_filter(name: str, decision: str, reason: str, seconds: float) -> None:
    """Count one filter decision and its duration (label children cached: no per-call lookup)."""
    c = _filter_children.get((name, decision, reason))
    if c is None:
        c = _filter_children[(name, decision, reason)] = counter_value(
            FILTER_DECISIONS.labels(name, decision, reason)
        )
    c.inc(1)
    h = _filter_hist_children.get(name)
    if h is None:
        h = _filter_hist_children[name] = histogram_recorder(FILTER_DURATION, name)
    h.observe(seconds)
