"""Privileges and route access policy. The route's ``access:`` block. See issue 3."""

from __future__ import annotations

from pydantic import Field

from gateway.configbase import Model


class AccessRule(Model):
    integration: bool = Field(False, description="A verified Fiks integration with a grant for this route's service")
    scopes: list[str] = Field(default_factory=list, description="Token scopes all required")
    person: bool = Field(False, description="An ID-porten person")
    acr: str | None = Field(None, description="Minimum ID-porten level for persons")
    pid_from: str | None = Field(None, description="path:/template/{pid}/ - the person may only reach their own pid")
    certificate_orgs: list[str] = Field(default_factory=list, description="Client certificate org numbers admitted")
    organizations: list[str] = Field(default_factory=list, description="Token consumer orgs admitted")


class AccessPolicy(Model):
    any_of: list[AccessRule] = Field(description="The request passes when one rule admits it")
