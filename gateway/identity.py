"""Identity forwarding to the upstream and the signed identity assertion. See issue 6."""

from __future__ import annotations

from pydantic import Field

from gateway.configbase import Model


class IdentityConfig(Model):
    header_prefix: str = Field("X-Portvakt-", description="Prefix of every identity header Portvakt sets")


class RouteForwardConfig(Model):
    person: bool = Field(False, description="Forward the person's identity (pid) to this upstream")
    client_cert: bool = Field(False, description="Forward the client certificate as RFC 9440 Client-Cert")
