"""Audit trail. Config section ``audit:``. See issue 6."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.configbase import Model


class AuditConfig(Model):
    enabled: bool = True
    path: str | None = Field(None, description="Append-only audit file (hash-chained)")
    durability: Literal["batch", "strict"] = "batch"
    key: str | None = Field(None, description="Audit HMAC key (use ${ENV})")
