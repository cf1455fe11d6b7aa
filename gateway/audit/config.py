"""The ``audit:`` config section (and its ``redis:`` second sink)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.configbase import Model


class AuditRedisConfig(Model):
    url: str = Field(
        description="redis:// URL of the second sink, or redis+cluster://h:p[,h:p] (use ${ENV} for a password)"
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
        if v.startswith(("redis+cluster://", "rediss+cluster://")):
            from filters.rate_limit.redis_store import parse_cluster_url

            try:
                parse_cluster_url(v)
            except ValueError:
                raise ValueError(
                    "not a valid Redis Cluster URL (host:port[,host:port...], no database)"
                ) from None
            return v
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss://, unix:// or redis+cluster:// URL")
        try:
            from redis.connection import parse_url

            parse_url(v)
        except ValueError:
            raise ValueError("not a valid Redis URL (host, port or database number)") from None
        return v


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
