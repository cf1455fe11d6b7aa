"""The audit trail's metrics (file writer and Redis stream sink)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import REGISTRY

RECORDS = Counter(
    "portvakt_audit_records_total",
    "Audit records by sink (file, redis) and result (written, failed, dropped, spooled)",
    ["sink", "result"],
    registry=REGISTRY,
)
WRITE_ERRORS = Counter(
    "portvakt_audit_write_errors_total",
    "Failed audit writes (file write/fsync, Redis XADD)",
    ["sink"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "portvakt_audit_queue_depth", "Audit records waiting to be written", ["sink"], registry=REGISTRY
)
FSYNC_SECONDS = Histogram(
    "portvakt_audit_fsync_seconds",
    "Time of one audit batch fsync",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "portvakt_audit_spool_bytes", "Bytes in the local spool of the Redis audit sink", registry=REGISTRY
)
