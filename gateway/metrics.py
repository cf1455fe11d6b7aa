"""Prometheus metrics, all named ``portvakt_*``, all with bounded label sets.

Labels are route, method, status, filter, decision, reason, result: never an org number, a
person, a path or a token. Stages that need their own series declare them here or in their module
against ``REGISTRY`` (so tests and the admin endpoint see one registry).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
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
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway import __version__

# No ``*_created`` series: they double the series count and nothing here reads them.
disable_created_metrics()

_recorders_live: list[Any] = []
_flush_lock = threading.Lock()


class FastCounter:
    """``.inc(n)`` into a plain number; added to the prometheus child at the next collection."""

    __slots__ = ("child", "n", "flushed")

    def __init__(self, child: Any):
        self.child = child
        self.n = 0.0
        self.flushed = 0.0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        n = self.n
        delta = n - self.flushed
        if delta:
            self.flushed = n
            self.child.inc(delta)


class FastHistogram:
    """``.observe(seconds)`` into plain per-bucket counts (a bucket is the first upper bound at or
    above the value, as prometheus-client's), added to the child at the next collection."""

    __slots__ = ("child", "bounds", "counts", "sum", "flushed_counts", "flushed_sum")

    def __init__(self, child: Any):
        self.child = child
        self.bounds = tuple(child._upper_bounds)  # noqa: SLF001 - see the comment above
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.flushed_counts = [0] * len(self.bounds)
        self.flushed_sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        i = bisect_left(self.bounds, amount)
        if i < len(self.counts):  # (NaN lands in no bucket, as in prometheus-client)
            self.counts[i] += 1

    def flush(self) -> None:
        child = self.child
        s = self.sum
        if s != self.flushed_sum:
            child._sum.inc(s - self.flushed_sum)  # noqa: SLF001
            self.flushed_sum = s
        done = self.flushed_counts
        for i, c in enumerate(self.counts):
            if c != done[i]:
                child._buckets[i].inc(c - done[i])  # noqa: SLF001
                done[i] = c


def flush_recorders() -> None:
    """Add what the request path's recorders counted to their prometheus children."""
    with _flush_lock:
        for r in _recorders_live:
            r.flush()


class _Flush(Collector):
    """Registered first in ``REGISTRY``: collecting the registry flushes the recorders before
    any of their metrics is collected. Describes and yields nothing itself."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        flush_recorders()
        return []


REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(_Flush())  # first: collecting the registry flushes the recorders (see below)


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
# values up and validates them on every call). What it records goes first into plain numbers on
# a recorder (``FastCounter``/``FastHistogram``: no lock, no per-bucket loop: ~0.15/0.3 µs
# instead of prometheus-client's 0.7/1.5 µs per call, about 8 µs per request over the counter,
# the two duration histograms and two filters' decisions and durations) and is added to the
# prometheus child when ``REGISTRY`` is collected: ``_Flush`` is the registry's first collector,
# so every exposition (``/metrics``, a worker's scrape, ``get_sample_value``) sees every request
# recorded before it. Recorders are written from the event loop thread only; a flush (any
# thread) adds what was recorded since the last flush, so nothing is lost or counted twice.
# The histogram flush adds to the child's ``_sum`` and ``_buckets`` values (prometheus-client
# internals, 0.2x; tests/gateway/test_metrics_recorders.py fails if they change).

_by_child: dict[Any, FastCounter] = {}


def counter_value(child: Any) -> FastCounter:
    """What the request path counts into for one labelled Counter child (``.inc(n)``): one
    recorder per child, however often it is asked for."""
    r = _by_child.get(child)
    if r is None:
        r = FastCounter(child)
        with _flush_lock:
            got = _by_child.setdefault(child, r)
            if got is r:
                _recorders_live.append(r)
            r = got
    return r


_recorders: dict[tuple[Any, tuple[str, ...]], Any] = {}


def histogram_recorder(histogram: Histogram, *labels: str) -> FastHistogram:
    """The (cached) recorder of ``histogram.labels(*labels)``; ``.observe(seconds)`` records."""
    key = (histogram, labels)
    r = _recorders.get(key)
    if r is None:
        r = _recorders[key] = FastHistogram(histogram.labels(*labels))
        with _flush_lock:
            _recorders_live.append(r)
    return r


_filter_children: dict[tuple[str, str, str], Any] = {}
_filter_hist_children: dict[str, Any] = {}


def observe_filter(name: str, decision: str, reason: str, seconds: float) -> None:
    """Count one filter decision and its duration (recorders cached: no per-call lookup)."""
    c = _filter_children.get((name, decision, reason))
    if c is None:
        c = _filter_children[(name, decision, reason)] = _counter_recorder(
            FILTER_DECISIONS, name, decision, reason
        )
    c.inc(1)
    h = _filter_hist_children.get(name)
    if h is None:
        h = _filter_hist_children[name] = histogram_recorder(FILTER_DURATION, name)
    h.observe(seconds)


_counters: dict[tuple[Any, tuple[str, ...]], FastCounter] = {}


def _counter_recorder(counter: Counter, *labels: str) -> FastCounter:
    key = (counter, labels)
    r = _counters.get(key)
    if r is None:
        r = _counters[key] = counter_value(counter.labels(*labels))
    return r
