"""Config of acting for an organisation and delegated administration: the ``delegation:``
section and a route's ``party:`` / ``privilege:`` blocks. Every field is documented where it is
declared (``portvakt config-doc`` lists them)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from filters.issuers import ACR_RANKS
from gateway.configbase import Model

ORG_RE = re.compile(r"^[0-9]{9}\Z")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}\Z")
ADMIN = "admin"  # the role that administers (org-wide with service "*", else one service)
ALL_SERVICES = "*"


class MaskinportenClientConfig(Model):
    token_url: str = Field(description="Maskinporten token endpoint (JWT bearer grant)")
    audience: str = Field(description="aud of the client assertion: the Maskinporten issuer")
    client_id: str = Field(description="This gateway's Maskinporten client id")
    key_file: str = Field(description="PEM RSA private key that signs the client assertion (RS256)")
    key_id: str | None = Field(None, description="kid of the registered key")
    scope: str = Field(
        "altinn:accessmanagement/authorizedparties.resourceowner",
        description="Scope asked for (ordered from Altinn and granted in Maskinporten)",
    )


class AltinnConfig(Model):
    base_url: str = Field(
        description="Altinn platform base URL (https://platform.altinn.no, tt02: https://platform.tt02.altinn.no)"
    )
    maskinporten: MaskinportenClientConfig = Field(description="How the gateway gets its Maskinporten token")
    cache_seconds: float = Field(
        300, gt=0, le=3600, description="A person's party list is fetched again after this long"
    )
    timeout_seconds: float = Field(3.0, gt=0, le=30, description="Each call to Maskinporten or Altinn")
    ca_file: str | None = Field(
        None, description="CA bundle for an https Altinn/Maskinporten with a private CA"
    )
    include_altinn2: bool = Field(
        False, description="includeAltinn2 query parameter (Altinn 2 is being retired)"
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")


class PrivilegeStoreConfig(Model):
    backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="sqlite: embedded file (one host); redis: every worker and host"
    )
    path: str = Field(
        "privileges.sqlite", description="SQLite file (backend sqlite), relative to the config file"
    )
    url: str | None = Field(
        None,
        description="Redis URL (backend redis): redis(s)://, unix://, redis(s)+sentinel://, "
        "redis(s)+cluster://; use ${ENV} for a password",
    )
    key_prefix: str = Field("portvakt:priv:", description="Prefix of every Redis key")
    timeout_seconds: float = Field(
        1.0, gt=0, le=30, description="Per store operation; past it the request gets 503"
    )

    @model_validator(mode="after")
    def _url(self) -> PrivilegeStoreConfig:
        from filters.redis_client import check_store_url

        check_store_url(self.backend, self.url)
        return self


class SeedAdmin(Model):
    organization: str = Field(description="Organisation number (9 digits)")
    person: str = Field(description="The first administrator's fødselsnummer/D-number; use ${ENV}")

    @field_validator("organization")
    @classmethod
    def _org(cls, v: str) -> str:
        if not ORG_RE.match(v):
            raise ValueError("must be 9 digits")
        return v

    @field_validator("person")
    @classmethod
    def _pid(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9]{11}", v):
            raise ValueError("must be 11 digits")
        return v


class AdminApiConfig(Model):
    path: str = Field(
        "/admin", description="Below persons.prefix: the admin API and page (<persons.prefix><path>)"
    )
    min_acr: str = Field("idporten-loa-high", description="Level a session needs for the admin API and page")
    requests_per_minute: int = Field(60, ge=1, le=10000, description="Per session; beyond it 429")
    page_size: int = Field(
        50, ge=1, le=500, description="Default page size of the audit view (limit caps at 500)"
    )

    @field_validator("min_acr")
    @classmethod
    def _acr(cls, v: str) -> str:
        if v not in ACR_RANKS:
            raise ValueError(f"unknown acr {v!r}")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not re.fullmatch(r"/[a-z0-9_-]{1,32}", v):
            raise ValueError("one path segment like /admin")
        return v


class DelegationConfig(Model):
    enabled: bool = Field(True, description="Parties, run-time privileges and the admin API")
    altinn: AltinnConfig | None = Field(
        None, description="Role source for acting on behalf of organisations (routes with party:)"
    )
    store: PrivilegeStoreConfig = Field(
        default_factory=PrivilegeStoreConfig, description="Where run-time grants live"
    )
    subject_key: str = Field(
        description="At least 32 characters: persons are stored as HMAC(subject_key, pid). Use ${ENV}"
    )
    admins: list[SeedAdmin] = Field(
        default_factory=list, description="Each organisation's first administrator (re-seeded at start)"
    )
    privileges: list[str] = Field(
        default_factory=lambda: ["user"], description="Privilege names besides admin that may be granted"
    )
    admin_api: AdminApiConfig = Field(default_factory=AdminApiConfig, description="The admin API and page")

    @field_validator("subject_key")
    @classmethod
    def _key(cls, v: str) -> str:
        if len(v) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("privileges")
    @classmethod
    def _privs(cls, v: list[str]) -> list[str]:
        for p in v:
            if not ROLE_RE.match(p) or p == ADMIN:
                raise ValueError(f"{p!r}: lower-case letters, digits and _; admin is implicit")
        return v


class RoutePartyPolicy(Model):
    """The request acts for an organisation: the person chose a party (POST <prefix>/party)."""

    organization_forms: list[str] = Field(
        default_factory=list, description="unitType values admitted (empty: any)"
    )


class RoutePrivilegePolicy(Model):
    """A run-time grant in the acting organisation (persons) or target organisation (integrations)."""

    role: str = Field(description="Privilege needed for the route's service (admin holds every privilege)")

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if not ROLE_RE.match(v):
            raise ValueError("lower-case letters, digits and _")
        return v
