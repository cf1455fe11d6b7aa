"""The ``audit:`` config section (and its ``redis:`` second sink)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.configbase import Model


class AuditRedisConfig(Model):
    url: str = Field(
        description="Redis URL of the second sink: redis(s)://, unix://, redis(s)+sentinel://, "
        "redis(s)+cluster:// (see the README's Redis section; use ${ENV} for a password)"
    )
    stream: str = Field("portvakt:audit", description="Stream key for XADD")
    maxlen: int | None = Field(None, gt=0, description="Approximate MAXLEN trim (absent: keep all)")
    spool_path: str = Field("audit-redis.spool", description="Local spool file while Redis is down")
    spool_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Spool bound; beyond it records are dropped"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Checked at load (redis-py would refuse it only when the sink starts); never echoed:
        # the URL may carry a password.
        from filters.redis_client import check_url

        return check_url(v)


class AuditConfig(Model):
    enabled: bool = Field(True, description="Write the audit trail")
    path: str | None = Field(None, description="Append-only audit file (hash-chained)")
    durability: Literal["batch", "strict"] = Field(
        "batch", description="batch: loss window = batch interval; strict: forward only after the fsync"
    )
    key: str | None = Field(None, description="Audit HMAC key (use ${ENV}); at least 16 characters")
    key_file: str | None = Field(None, description="File holding the audit key (alternative to key)")
    auditor_public_key: str | None = Field(
        None, description="PEM X25519 or RSA public key: persons' ids are also sealed to it"
    )
    batch_interval_ms: float = Field(50, ge=0, le=10_000, description="Group commit interval in batch mode")
    strict_timeout_seconds: float = Field(
        2.0, gt=0, description="strict: longest wait for the fsync before 503"
    )
    rotate_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="Rotate the file when it would exceed this size"
    )
    rotate_daily: bool = Field(True, description="Rotate at the first record of a new UTC day")
    queue_max: int = Field(
        100_000, gt=0, description="Records queued before new ones are dropped (and counted)"
    )
    fsync: bool = Field(True, description="fdatasync each batch (turn off only for benchmarks)")
    redis: AuditRedisConfig | None = Field(None, description="Optional second sink: Redis Streams")
