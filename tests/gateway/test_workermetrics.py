"""Merging the workers' own registries (gateway/workermetrics.py): sums, gauge modes, retired
workers, and exposition the Prometheus parser reads back."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.workermetrics import MergedCollector, WorkerMetrics


def worker_text(requests: int, inflight: int, reload_ts: float, keys: int, observe: list[float]) -> str:
    r = CollectorRegistry()
    c = Counter("portvakt_requests_total", "Requests", ["route"], registry=r)
    c.labels("a").inc(requests)
    Gauge("portvakt_requests_in_flight", "In flight", registry=r).set(inflight)
    Gauge("portvakt_config_last_reload_success_timestamp_seconds", "Last reload", registry=r).set(reload_ts)
    Gauge("portvakt_jwks_keys", "Keys", ["issuer"], registry=r).labels("mp").set(keys)
    h = Histogram("portvakt_request_duration_seconds", "Duration", ["route"], buckets=(0.1, 1.0), registry=r)
    for v in observe:
        h.labels("a").observe(v)
    return generate_latest(r).decode()


def exposition(wm: WorkerMetrics, scraped) -> dict:
    reg = CollectorRegistry()
    reg.register(MergedCollector(wm.merge(scraped)))
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):  # what Prometheus would read
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_and_histograms_sum_gauges_follow_their_mode():
    wm = WorkerMetrics()
    got = exposition(
        wm,
        [
            ((0, 11), 11, worker_text(3, 1, 100.0, 2, [0.05])),
            ((1, 12), 12, worker_text(4, 2, 200.0, 3, [0.5, 5.0])),
        ],
    )
    assert got[("portvakt_requests_total", (("route", "a"),))] == 7
    assert got[("portvakt_request_duration_seconds_bucket", (("le", "0.1"), ("route", "a")))] == 1
    assert got[("portvakt_request_duration_seconds_bucket", (("le", "1.0"), ("route", "a")))] == 2
    assert got[("portvakt_request_duration_seconds_count", (("route", "a"),))] == 3
    assert got[("portvakt_requests_in_flight", ())] == 3  # livesum
    assert got[("portvakt_config_last_reload_success_timestamp_seconds", ())] == 200.0  # max
    # a gauge without a mode: one series per worker
    assert got[("portvakt_jwks_keys", (("issuer", "mp"), ("pid", "11")))] == 2
    assert got[("portvakt_jwks_keys", (("issuer", "mp"), ("pid", "12")))] == 3
    assert not any(name.endswith("_created") for name, _ in got)


def test_a_restarted_worker_does_not_make_counters_fall():
    wm = WorkerMetrics()
    exposition(
        wm, [((0, 11), 11, worker_text(5, 0, 1, 1, [0.05])), ((1, 12), 12, worker_text(4, 0, 1, 1, []))]
    )
    wm.retire((0, 11))  # worker 0 died; its replacement starts from zero
    got = exposition(
        wm, [((0, 13), 13, worker_text(1, 0, 1, 1, [])), ((1, 12), 12, worker_text(6, 0, 1, 1, []))]
    )
    assert got[("portvakt_requests_total", (("route", "a"),))] == 5 + 1 + 6
    assert got[("portvakt_request_duration_seconds_count", (("route", "a"),))] == 1
    # its per-worker gauges are gone with it
    assert ("portvakt_jwks_keys", (("issuer", "mp"), ("pid", "11"))) not in got


def test_families_the_supervisor_serves_itself_are_not_repeated():
    r = CollectorRegistry()
    Gauge("portvakt_build_info", "Build", ["version"], registry=r).labels("1").set(1)
    Counter("portvakt_requests_total", "Requests", registry=r).inc()
    wm = WorkerMetrics()
    names = [
        m.name for m in wm.merge([((0, 5), 5, generate_latest(r).decode())], skip={"portvakt_build_info"})
    ]
    assert names == ["portvakt_requests"]
