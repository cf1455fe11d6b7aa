"""The ``identity:`` config section and each route's ``forward:`` block."""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.configbase import Model


class AssertionConfig(Model):
    enabled: bool = Field(True, description="Send the signed identity assertion header")
    header: str = Field("Assertion", description="Header name after the prefix")
    issuer: str = Field("portvakt", description="The assertion's iss claim")
    lifetime_seconds: int = Field(60, ge=1, le=3600, description="exp - iat of each assertion")
    reuse_seconds: int | None = Field(
        None,
        ge=0,
        description="How long one signed assertion serves further requests with the same verified "
        "facts, route and key (default: half the lifetime, so a reused one has at least that left; at most "
        "lifetime - 1; 0: sign per request). The per-request id travels in X-Request-Id, not in the assertion",
    )
    key_dir: str | None = Field(
        None, description="Directory managed by `portvakt assertion-keys`; absent: ephemeral key"
    )
    manifest_poll_seconds: float = Field(
        5.0, ge=0, description="How often the manifest is re-read for rotations (0: only at load)"
    )


class IdentityConfig(Model):
    header_prefix: str = Field("X-Portvakt-", description="Prefix of every identity header Portvakt sets")
    assertion: AssertionConfig = Field(default_factory=AssertionConfig)
    strip_extra: list[str] = Field(
        default_factory=list, description="More client header names always removed (legacy identity headers)"
    )

    @field_validator("header_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("letters, digits, '-' or '_' only")
        return v


class RouteForwardConfig(Model):
    person: bool = Field(False, description="Forward the person's identity (pid) to this upstream")
    client_cert: bool = Field(False, description="Forward the client certificate as RFC 9440 Client-Cert")
    bearer_token: bool = Field(
        False,
        description="Pass the verified bearer token on as Authorization (default: stripped). For an upstream that "
        "must call further APIs with the caller's token or re-checks it itself; the token then leaves the gate and "
        "can be replayed by the upstream until it expires. An unverified token is never forwarded",
    )
