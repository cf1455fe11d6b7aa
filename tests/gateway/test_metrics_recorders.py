"""The request path's metric recorders (gateway/metrics.py): plain numbers on the hot path, added
to the prometheus children whenever the registry is collected. Exposition must be exactly what
prometheus-client itself would show for the same observations."""

from __future__ import annotations

import math
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway import metrics

BUCKETS = metrics.LATENCY_BUCKETS
VALUES = [0.0, 0.0004, 0.0005, 0.0005000001, 0.001, 0.003, 0.0099, 0.01, 0.7, 2.5, 29.9, 30, 31, 1e9]


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_histogram_recorder_exposes_what_prometheus_would() -> None:
    # The reference: a prometheus-client histogram with the same buckets, observed directly.
    ref_registry = CollectorRegistry()
    ref = Histogram("ref_seconds", "ref", ["route"], buckets=BUCKETS, registry=ref_registry)
    rec = metrics.histogram_recorder(metrics.REQUEST_DURATION, "test-recorder-exact")
    assert metrics.histogram_recorder(metrics.REQUEST_DURATION, "test-recorder-exact") is rec
    for v in VALUES:
        rec.observe(v)
        ref.labels("x").observe(v)
    for bound in [*BUCKETS, math.inf]:
        le = "+Inf" if bound == math.inf else str(float(bound))
        want = ref_registry.get_sample_value("ref_seconds_bucket", {"route": "x", "le": le})
        got = _sample("portvakt_request_duration_seconds_bucket", {"route": "test-recorder-exact", "le": le})
        assert got == want, le
    assert _sample("portvakt_request_duration_seconds_count", {"route": "test-recorder-exact"}) == len(VALUES)
    assert _sample("portvakt_request_duration_seconds_sum", {"route": "test-recorder-exact"}) == sum(VALUES)


def test_every_collection_sees_everything_recorded_and_nothing_twice() -> None:
    rec = metrics.histogram_recorder(metrics.UPSTREAM_DURATION, "test-recorder-twice")
    c = metrics.counter_value(metrics.REQUESTS.labels("test-recorder-twice", "GET", "200", "allow"))
    labels = {"route": "test-recorder-twice", "method": "GET", "status": "200", "decision": "allow"}
    for n in range(1, 4):
        rec.observe(0.002)
        c.inc(1)
        text = generate_latest(metrics.REGISTRY).decode()  # the /metrics path
        assert (
            f'portvakt_upstream_duration_seconds_count{{upstream="test-recorder-twice"}} {float(n)}' in text
        )
        assert _sample("portvakt_requests_total", labels) == n  # collected again: not added twice
    # The same child asked for again (a cleared label cache) keeps one recorder.
    again = metrics.counter_value(metrics.REQUESTS.labels("test-recorder-twice", "GET", "200", "allow"))
    assert again is c


def test_filter_observations_reach_the_registry() -> None:
    metrics.observe_filter("test-recorder-filter", "deny", "some_reason", 0.0003)
    metrics.observe_filter("test-recorder-filter", "deny", "some_reason", 0.0003)
    assert (
        _sample(
            "portvakt_filter_decisions_total",
            {"filter": "test-recorder-filter", "decision": "deny", "reason": "some_reason"},
        )
        == 2
    )
    assert (
        _sample("portvakt_filter_duration_seconds_bucket", {"filter": "test-recorder-filter", "le": "0.0005"})
        == 2
    )


def test_collections_from_another_thread_lose_nothing() -> None:
    """Scrapes may run while the loop records: the totals end exact."""
    c = metrics.counter_value(metrics.REQUESTS.labels("test-recorder-race", "GET", "200", "allow"))
    h = metrics.histogram_recorder(metrics.REQUEST_DURATION, "test-recorder-race")
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            metrics.flush_recorders()

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for _ in range(50_000):
            c.inc(1)
            h.observe(0.001)
    finally:
        stop.set()
        t.join()
    labels = {"route": "test-recorder-race", "method": "GET", "status": "200", "decision": "allow"}
    assert _sample("portvakt_requests_total", labels) == 50_000
    assert _sample("portvakt_request_duration_seconds_count", {"route": "test-recorder-race"}) == 50_000


def test_a_counter_of_another_registry_is_not_needed() -> None:
    """The recorder adds to the very child the gateway registered (not a copy)."""
    reg = CollectorRegistry()
    own = Counter("own_total", "own", ["x"], registry=reg)
    r = metrics.counter_value(own.labels("a"))
    r.inc(3)
    metrics.flush_recorders()
    assert reg.get_sample_value("own_total", {"x": "a"}) == 3
