"""Fiks integrations (IntegrasjonId + IntegrasjonPassord). Config section ``integrations:``. See issue 3."""

from __future__ import annotations

from pydantic import Field

from gateway.configbase import Model


class GrantConfig(Model):
    organization: str = Field(description="The organisation (org number) that granted access")
    services: list[str] = Field(description="Services of that organisation this integration may use")


class IntegrationConfig(Model):
    id: str = Field(description="IntegrasjonId (UUID)")
    password_hash: str = Field(description="argon2id hash from `portvakt hash-password`")
    authorized_org: str = Field(description="Org number that owns the Maskinporten client")
    require_certificate: bool = Field(False, description="Require an enterprise client cert with the same org")
    grants: list[GrantConfig] = Field(default_factory=list)
