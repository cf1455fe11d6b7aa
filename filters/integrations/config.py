"""The ``integrations:`` list and the ``integrations_policy:`` section; the argon2id hash floor."""

from __future__ import annotations

import re
from typing import Literal

import argon2
from argon2.exceptions import InvalidHashError
from pydantic import Field, field_validator

from gateway.chain import Mode
from gateway.configbase import Model

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
ORG_RE = re.compile(r"^[0-9]{9}\Z")
MAX_PASSWORD_LENGTH = 1024  # longer values are refused before argon2 (cheap DoS guard)


class GrantConfig(Model):
    organization: str = Field(description="The organisation (org number) that granted access")
    services: list[str] = Field(description="Services of that organisation this integration may use")

    @field_validator("organization")
    @classmethod
    def _org(cls, v: str) -> str:
        if not ORG_RE.match(v):
            raise ValueError("must be a 9-digit organisation number")
        return v

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[str]) -> list[str]:
        if not v or any(not s.strip() for s in v):
            raise ValueError("must list at least one non-empty service name")
        return v


class IntegrationConfig(Model):
    id: str = Field(description="IntegrasjonId (UUID)")
    password_hash: str = Field(description="argon2id hash from `portvakt hash-password`")
    authorized_org: str = Field(description="Org number that owns the Maskinporten client")
    require_certificate: bool = Field(
        False, description="Require an enterprise client cert with the same org"
    )
    grants: list[GrantConfig] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not UUID_RE.match(v):
            raise ValueError("must be a UUID like 7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07")
        return v.lower()

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        try:
            params = argon2.extract_parameters(v)
        except InvalidHashError:
            raise ValueError("not an argon2 hash: make one with `portvakt hash-password`") from None
        if params.type is not argon2.Type.ID:
            raise ValueError("must be an argon2id hash ($argon2id$...)")
        return v

    @field_validator("authorized_org")
    @classmethod
    def _org(cls, v: str) -> str:
        if not ORG_RE.match(v):
            raise ValueError("must be a 9-digit organisation number")
        return v


class BruteForceConfig(Model):
    enabled: bool = Field(True, description="Count failed integration logins and refuse repeated ones")
    free_failures: int = Field(3, ge=0, description="Failures per (id, client IP) answered without any delay")
    max_failures: int = Field(10, ge=1, description="Failures per (id, client IP) that lock that pair out")
    ip_free_failures: int = Field(
        10,
        ge=0,
        description="Failures from one client IP (any id, unknown ids too) answered without delay; "
        "each further one makes that IP wait 1 s, 2 s, 4 s ... (429 meanwhile) until ip_max_failures locks it",
    )
    ip_max_failures: int = Field(
        30, ge=1, description="Failures from one client IP (any id) that lock the IP out"
    )
    id_max_failures: int = Field(
        100,
        ge=1,
        description="Failures for one id (any IP) that lock the id out, except for recently good (id, IP) pairs",
    )
    lockout_seconds: float = Field(
        300.0, gt=0, description="How long a lockout lasts (also the longest delay)"
    )
    decay_seconds: float = Field(
        60.0, gt=0, description="One counted failure is forgotten every decay_seconds"
    )
    known_good_seconds: float = Field(
        86400.0,
        ge=0,
        description="An (id, IP) pair that authenticated is exempt from the per-id lockout this long",
    )
    max_tracked: int = Field(100_000, ge=100, description="Bound on remembered keys per table (LRU)")
    redis_url: str | None = Field(
        None,
        description="Redis URL, any form of the README's Redis section (use ${ENV} for a password): counts and "
        "lockouts shared by every worker and host using it. Absent: in-process (per process). Redis failing: in-process fallback",
    )
    redis_key_prefix: str = Field("portvakt", description="Prefix of the brute-force keys in Redis")
    redis_timeout_ms: int = Field(
        1000,
        gt=0,
        le=10_000,
        description="Per Redis call; then the in-process fallback (which has mirrored this process's counts)",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        from filters.redis_client import check_url

        return v if v is None else check_url(v)


class IntegrationsPolicyConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce for the integrations filter")
    brute_force: BruteForceConfig = Field(default_factory=BruteForceConfig)
    failure_cache_seconds: float = Field(
        60.0,
        ge=0,
        description="How long a failed (id, password) is remembered so argon2 does not rerun for it",
    )
    max_concurrent_verifications: int = Field(
        0, ge=0, description="argon2 threads (0: the number of CPUs); further verifications queue"
    )
    max_concurrent_verifications_per_address: int = Field(
        1,
        ge=1,
        description="argon2 verifications one client address may have running or queued in the "
        "pool at once; its further attempts wait for its own slot (unknown ids never take one)",
    )
    password_hash_floor: Literal["owasp", "none"] = Field(
        "owasp",
        description="owasp: refuse argon2id hashes cheaper than OWASP's minimum (memory KiB per time cost: t=1 "
        "47104, t=2 19456, t=3 12288, t=4 9216, t>=5 7168; parallelism 1 or more). none: accept any (tests only)",
    )


# equally strong; any parallelism of 1 or more. Costlier settings (RFC 9106's are) pass.
ARGON2_FLOOR_KIB = {1: 47104, 2: 19456, 3: 12288, 4: 9216, 5: 7168}


def below_floor(password_hash: str) -> str | None:
    """Why an argon2id hash is weaker than the floor (``ARGON2_FLOOR_KIB``), or None."""
    p = argon2.extract_parameters(password_hash)
    need = ARGON2_FLOOR_KIB[min(p.time_cost, 5)]
    if p.memory_cost < need:
        return (
            f"argon2 parameters m={p.memory_cost} KiB, t={p.time_cost} are below the floor (t={min(p.time_cost, 5)} "
            f"needs m >= {need} KiB, OWASP's argon2id minimum): re-hash with `portvakt hash-password`"
        )
    return None
