"""Rate limiting (GCRA) on Redis or in-process. Config section ``rate_limit:``. See issue 4."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class RateLimitConfig(Model):
    mode: Mode = Mode.enforce
    backend: str = Field("memory", description='"memory", redis://, rediss://, redis+sentinel://')
    key_prefix: str = "portvakt"
    timeout_ms: int = Field(50, gt=0, description="Per Redis operation")
    on_backend_error: Literal["local", "allow", "deny"] = "local"


class RateLimitRule(Model):
    per: Literal["client_ip", "integration", "organization", "person", "route"]
    limit: int = Field(gt=0)
    period_seconds: float = Field(gt=0)
    burst: int | None = Field(None, ge=1)
    stage: Literal["pre_auth", "post_auth"] = "post_auth"
