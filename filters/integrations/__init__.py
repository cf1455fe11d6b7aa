"""Fiks integrations (``IntegrasjonId`` + ``IntegrasjonPassord``). Config section ``integrations:``.

An integration is a client system registered with an id (UUID), an argon2id password hash and the
organisation that owns its Maskinporten client. The rooms:

- ``config.py``: ``integrations:`` and ``integrations_policy:`` (and the argon2id hash floor).
- ``stage.py``: ``IntegrationsStage`` and ``IntegrationsFilter``: the headers, the org and
  certificate binding, the one generic 401 for every failure, reason ids.
- ``credentials.py``: ``CredentialVerifier``: argon2id off the event loop, success and failure
  caches, single flight, failure-time padding, per-address share of the argon2 pool.
- ``lockout.py``: brute-force accounting (per (id, IP), per IP, per id), delays and lockouts.
- ``clock.py``: the clock of the caches and lockouts. ``hash_password.py``: ``portvakt hash-password``.

The names below are the package's public API (importers need not know the rooms).
"""

from __future__ import annotations

from filters.integrations import clock
from filters.integrations.config import (
    ARGON2_FLOOR_KIB,
    MAX_PASSWORD_LENGTH,
    ORG_RE,
    UUID_RE,
    BruteForceConfig,
    GrantConfig,
    IntegrationConfig,
    IntegrationsPolicyConfig,
    below_floor,
)
from filters.integrations.credentials import ARGON2_RUNS, CREDENTIAL_CACHE, CredentialVerifier
from filters.integrations.hash_password import cmd_hash_password, register_commands
from filters.integrations.lockout import (
    LOCKOUTS,
    Admission,
    FailureTracker,
    LocalFailureStore,
    record_lockouts,
)
from filters.integrations.stage import (
    CHALLENGE,
    ID_HEADER,
    INTEGRATION_AUTH_FAILED,
    PASSWORD_HEADER,
    TOO_MANY_FAILED_ATTEMPTS,
    IntegrationsFilter,
    IntegrationsStage,
    build_stage,
)


def _now() -> float:
    """The clock of the caches and lockouts (``clock.now``); filters/bruteforce_redis.py reads it here."""
    return clock.now()


__all__ = [
    "ARGON2_FLOOR_KIB",
    "ARGON2_RUNS",
    "CHALLENGE",
    "CREDENTIAL_CACHE",
    "ID_HEADER",
    "INTEGRATION_AUTH_FAILED",
    "LOCKOUTS",
    "MAX_PASSWORD_LENGTH",
    "ORG_RE",
    "PASSWORD_HEADER",
    "TOO_MANY_FAILED_ATTEMPTS",
    "UUID_RE",
    "Admission",
    "BruteForceConfig",
    "CredentialVerifier",
    "FailureTracker",
    "GrantConfig",
    "IntegrationConfig",
    "IntegrationsFilter",
    "IntegrationsPolicyConfig",
    "IntegrationsStage",
    "LocalFailureStore",
    "below_floor",
    "build_stage",
    "clock",
    "cmd_hash_password",
    "record_lockouts",
    "register_commands",
]
