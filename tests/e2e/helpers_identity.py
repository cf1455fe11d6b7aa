"""Configs and calls shared by the identity end-to-end tests (integrations, authorize)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from argon2 import PasswordHasher

from gateway.norid import generate_fnr
from tests.fixtures.gateway import basic_config

# Cheap argon2 parameters keep the gateway's first verification fast in tests.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

INTEGRATION_ID = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
UNKNOWN_ID = "11111111-2222-4333-8444-555555555555"
PASSWORD = "riktig-passord"
OWNER_ORG = "991825827"  # the pki fixture's SEID 2 client certificate org
GRANTING_ORG = "958935420"  # the pki fixture's SEID 1 client certificate org
OTHER_ORG = "974760673"

PERSON = generate_fnr(dt.date(1985, 5, 17), 401, synthetic=True)
OTHER_PERSON = generate_fnr(dt.date(1990, 1, 2), 123, synthetic=True)

ORG_URL = "/innsyn/api/v1/orgs/{org}/saker"
PERSON_URL = "/innsyn/api/v1/personer/{pid}/saker"


def innsyn_route(**access_overrides: Any) -> dict:
    return {
        "name": "innsyn",
        "match": {"path_prefix": "/innsyn/"},
        "upstream": "demo",
        "service": "innsyn",
        "legal_basis": "offentleglova § 3",
        "organization_from": "path:/innsyn/api/v1/orgs/{organization}/",
        "access": {
            "any_of": [
                {"integration": True, "scopes": ["ks:fiks"]},
                {
                    "person": True,
                    "acr": "idporten-loa-high",
                    "pid_from": "path:/innsyn/api/v1/personer/{pid}/",
                },
                {"certificate_orgs": [GRANTING_ORG]},
            ],
            **access_overrides,
        },
    }


def integration_entry(password_hash: str | None = None, grants: list[dict] | None = None, **kw: Any) -> dict:
    return {
        "id": INTEGRATION_ID,
        "password_hash": password_hash or FAST.hash(PASSWORD),
        "authorized_org": OWNER_ORG,
        "grants": [{"organization": GRANTING_ORG, "services": ["innsyn"]}] if grants is None else grants,
        **kw,
    }


def identity_config(
    upstream_url: str, issuer: Any, integrations: list[dict] | None = None, **sections: Any
) -> dict:
    # The cheap test hashes (FAST) are below the production floor on purpose.
    sections["integrations_policy"] = {
        "password_hash_floor": "none",
        **sections.get("integrations_policy", {}),
    }
    return basic_config(
        upstream_url,
        issuers=issuer.issuers_config(),
        integrations=[integration_entry()] if integrations is None else integrations,
        routes=[innsyn_route()],
        **sections,
    )


def creds(iid: str = INTEGRATION_ID, password: str = PASSWORD) -> dict[str, str]:
    return {"IntegrasjonId": iid, "IntegrasjonPassord": password}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(session: Any, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    """GET; returns (status, body as JSON, response headers)."""
    async with session.get(url, headers=headers or {}) as r:
        raw = await r.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"raw": raw.decode(errors="replace")}
        return r.status, body, r.headers
