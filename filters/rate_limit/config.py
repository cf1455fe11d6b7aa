"""``rate_limit:`` and ``routes[].rate_limits[]``: the config models (validated at load)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from filters.redis_client import SCHEMES_TEXT, RedisTarget, parse_hostport, parse_redis_url
from gateway.chain import Mode
from gateway.configbase import Model

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
PRE_AUTH_SUBJECTS = ("client_ip", "route")


class SentinelConfig(Model):
    hosts: list[str] = Field(min_length=1, description="Sentinels as HOST:PORT")
    service_name: str = Field(description="The monitored master's name (sentinel monitor NAME ...)")
    db: int = Field(0, ge=0, description="Database number on the master")
    username: str | None = Field(None, description="ACL user for the sentinels themselves")
    password: str | None = Field(None, description="Password for the sentinels themselves (use ${ENV})")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            parse_hostport(h, 26379)
        return v

    tls: bool = Field(
        False, description="TLS to the sentinels and the master (also on when a tls_*_file is set)"
    )


class RateLimitConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect (headers, no 429) | enforce")
    backend: str = Field(
        "memory",
        description='"memory" (in-process), redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path, '
        "redis+sentinel://[user:pass@]h:p[,h:p]/service[/db] (rediss+sentinel:// with TLS), "
        "redis+cluster://[user:pass@]h:p[,h:p] (Redis Cluster; rediss+cluster:// with TLS), "
        'or "sentinel" (use the sentinel block). TLS files may also ride in the URL query '
        "(?ssl_ca_certs=...&ssl_certfile=...&ssl_keyfile=...); the tls_* fields below win",
    )
    key_prefix: str = Field("portvakt", description="Prefix of every Redis key")
    timeout_ms: int = Field(
        50, gt=0, le=10_000, description="Per Redis operation; a request never waits longer"
    )
    connect_timeout_ms: int = Field(1000, gt=0, description="Connect/probe timeout, off the request path")
    on_backend_error: Literal["local", "allow", "deny"] = Field(
        "local", description="When Redis fails: local in-process GCRA | allow | deny (503)"
    )
    username: str | None = Field(None, description="Redis ACL user (overrides the URL's)")
    password: str | None = Field(None, description="Redis password (overrides the URL's; use ${ENV})")
    tls_ca_file: str | None = Field(None, description="CA bundle to verify a rediss:// server")
    tls_cert_file: str | None = Field(None, description="Client certificate for Redis mTLS")
    tls_key_file: str | None = Field(None, description="Client key for Redis mTLS")
    tls_check_hostname: bool = Field(True, description="Verify the Redis server's host name")
    sentinel: SentinelConfig | None = Field(None, description='Sentinel set-up when backend is "sentinel"')
    max_connections: int = Field(16, ge=1, le=1024, description="Redis connection pool size per process")
    autopipeline: bool = Field(True, description="Send checks of one event-loop tick in one round trip")
    max_inflight_batches: int = Field(4, ge=1, le=1024, description="Pipelined batches on the wire at once")
    breaker_failures: int = Field(3, ge=1, description="Consecutive failed round trips that open the breaker")
    breaker_backoff_ms: int = Field(1000, gt=0, description="First wait before a half-open probe")
    breaker_max_backoff_ms: int = Field(
        1000,
        gt=0,
        description="Longest wait between probes (doubling from breaker_backoff_ms). The default equals "
        "breaker_backoff_ms: a probe every second, so the breaker closes within a second of Redis returning",
    )
    pseudonym_key: str | None = Field(
        None,
        min_length=16,
        description="HMAC key for person / client-IP subjects; required with Redis if such rules exist "
        "(the same on every gateway process; use ${ENV})",
    )
    ipv6_prefix_length: int = Field(64, ge=1, le=128, description="client_ip: one subject per IPv6 prefix")
    max_local_keys: int = Field(100_000, ge=100, description="Subjects kept by the in-process limiter")
    lease_checks: int = Field(
        0,
        ge=0,
        le=256,
        description="Redis: for a subject far from its limit (at least 16 x this many requests still "
        "admissible after them), take this many checks in one round trip and admit the rest of them in "
        "this process within a second, without asking Redis. Never admits more than the policy; a lease "
        "unused within the second is lost, so such a subject may be refused up to this many requests "
        "early per process. 0 (default): every check asks Redis (exact)",
    )

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.match(v):
            raise ValueError("letters, digits, '_', '.', ':', '-' only (no braces: they are the hash tag)")
        return v

    @field_validator("backend")
    @classmethod
    def _backend_url(cls, v: str) -> str:
        if v not in ("memory", "sentinel"):
            try:
                parse_redis_url(v)
            except ValueError as e:  # never echoes the URL (it may carry a password)
                raise ValueError(f'"memory", "sentinel" or a {SCHEMES_TEXT} URL: {e}') from None
        return v

    @model_validator(mode="after")
    def _backend(self) -> RateLimitConfig:
        b = self.backend
        if b == "sentinel":
            if self.sentinel is None:
                raise ValueError('backend "sentinel" needs a sentinel: block')
        elif self.sentinel is not None:
            raise ValueError('a sentinel: block needs backend: "sentinel"')
        if self.autopipeline and self.max_inflight_batches > self.max_connections:
            raise ValueError("max_inflight_batches cannot exceed max_connections")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if (self.tls_ca_file or self.tls_cert_file) and b != "sentinel" and not self.redis_target().tls:
            raise ValueError(
                "TLS options need a TLS backend (rediss://, rediss+sentinel://, rediss+cluster://)"
            )
        return self

    def redis_target(self) -> RedisTarget:
        """The Redis endpoint with this section's overrides (username, password, tls_*) applied."""
        if self.backend == "sentinel":
            sc = self.sentinel
            assert sc is not None
            t = RedisTarget(
                "sentinel",
                tls=sc.tls or bool(self.tls_ca_file or self.tls_cert_file),
                hosts=tuple(parse_hostport(h, 26379) for h in sc.hosts),
                db=sc.db,
                service_name=sc.service_name,
                sentinel_username=sc.username,
                sentinel_password=sc.password,
            )
        else:
            t = parse_redis_url(self.backend)
        t = t.replace(
            username=self.username,
            password=self.password,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
        )
        return t if self.tls_check_hostname else t.replace(tls_check_hostname=False)

    def backend_signature(self) -> tuple[object, ...]:
        """What decides whether a reload can keep the Redis client (see Stage.adopt)."""
        return (
            self.backend,
            self.timeout_ms,
            self.connect_timeout_ms,
            self.username,
            self.password,
            self.tls_ca_file,
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_check_hostname,
            self.sentinel,
            self.max_connections,
            self.autopipeline,
            self.max_inflight_batches,
            self.breaker_failures,
            self.breaker_backoff_ms,
            self.breaker_max_backoff_ms,
            self.max_local_keys,
            self.lease_checks,
        )


class RateLimitRule(Model):
    per: Literal["client_ip", "integration", "organization", "person", "route"] = Field(
        description="Subject the limit counts per"
    )
    limit: int = Field(gt=0, description="Requests per period")
    period_seconds: float = Field(gt=0, description="The period of `limit`")
    burst: int | None = Field(None, ge=1, description="Admitted at once from idle (default: limit)")
    stage: Literal["pre_auth", "post_auth"] = Field(
        "post_auth", description="pre_auth: before WAF and credentials (client_ip/route only)"
    )
    name: str | None = Field(None, description="Policy name in the RateLimit headers (default: per)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("letters, digits, '_', '.', '-' only (max 64)")
        return v

    @model_validator(mode="after")
    def _stage(self) -> RateLimitRule:
        if self.stage == "pre_auth" and self.per not in PRE_AUTH_SUBJECTS:
            raise ValueError(
                f"a pre_auth rule can only count per {' or '.join(PRE_AUTH_SUBJECTS)} (no identity yet)"
            )
        return self
