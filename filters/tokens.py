"""Bearer token validation (Maskinporten, ID-porten). Config section ``issuers:``. See issue 3."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class IssuerConfig(Model):
    kind: Literal["maskinporten", "idporten"] = Field(description="What shape of token this issuer mints")
    issuer: str = Field(description="Exact `iss` value")
    jwks_uri: str | None = Field(None, description="Where the issuer publishes its keys")
    jwks_file: str | None = Field(None, description="A JWKS file instead of jwks_uri (air-gapped setups, tests)")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "RS384", "RS512"])
    audience: str | None = Field(None, description="Required `aud` when set")
    leeway_seconds: int = Field(30, ge=0)
    jwks_cache_seconds: int = Field(3600, gt=0)
    mode: Mode = Mode.enforce
