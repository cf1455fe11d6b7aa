"""Hand-built contexts and configs for the integrations and authorize unit tests."""

from __future__ import annotations

import datetime as dt
from ipaddress import ip_address
from typing import Any

import yaml
from argon2 import PasswordHasher
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.chain import BuildEnv
from gateway.config import Config, parse_config
from gateway.context import CertificateIdentity, IntegrationIdentity, RequestContext, TokenIdentity
from gateway.norid import generate_fnr

# Cheap argon2 for tests (t=1, m=8 KiB, p=1): microseconds instead of ~140 ms.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

INTEGRATION_ID = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
OTHER_ID = "0f0e0d0c-0b0a-4909-8807-060504030201"
UNKNOWN_ID = "11111111-2222-4333-8444-555555555555"
PASSWORD = "riktig-passord"
OWNER_ORG = "991825827"  # owns the Maskinporten client (dev SEID 2 cert org)
GRANTING_ORG = "958935420"  # granted the integration access (dev SEID 1 cert org)
OTHER_ORG = "974760673"

PERSON = generate_fnr(dt.date(1985, 5, 17), 401, synthetic=True)
OTHER_PERSON = generate_fnr(dt.date(1990, 1, 2), 123, synthetic=True)


def integration(iid: str = INTEGRATION_ID, password: str = PASSWORD, org: str = OWNER_ORG, **kw: Any) -> dict:
    return {
        "id": iid,
        "password_hash": kw.pop("password_hash", None) or FAST.hash(password),
        "authorized_org": org,
        **kw,
    }


def make_config(
    integrations: list[dict] | None = None,
    routes: list[dict] | None = None,
    integrations_policy: dict | None = None,
) -> Config:
    doc: dict[str, Any] = {
        "server": {"plain_http": True},
        "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
        "integrations": integrations if integrations is not None else [integration()],
        "routes": routes
        if routes is not None
        else [
            {
                "name": "r",
                "upstream": "u",
                "access": {"any_of": [{"integration": True}]},
                "service": "innsyn",
                "organization_from": "header:FiksOrgId",
            }
        ],
    }
    # The cheap test hashes (FAST) are below the production floor on purpose.
    doc["integrations_policy"] = {"password_hash_floor": "none", **(integrations_policy or {})}
    return parse_config(yaml.safe_dump(doc))


def env(config: Config, secrets: dict | None = None) -> BuildEnv:
    return BuildEnv(config=config, base_dir=".", secrets=secrets if secrets is not None else {})


def maskinporten(org: str = OWNER_ORG, scopes: tuple[str, ...] = ("ks:fiks",)) -> TokenIdentity:
    return TokenIdentity(
        kind="maskinporten",
        issuer="maskinporten",
        iss="https://maskinporten.no/",
        exp=2_000_000_000,
        consumer=f"0192:{org}",
        consumer_org=org,
        scopes=frozenset(scopes),
    )


def idporten(
    pid: str = PERSON, acr: str = "idporten-loa-high", scopes: tuple[str, ...] = ("openid",)
) -> TokenIdentity:
    return TokenIdentity(
        kind="idporten",
        issuer="idporten",
        iss="https://idporten.no",
        exp=2_000_000_000,
        pid=pid,
        acr=acr,
        scopes=frozenset(scopes),
    )


def certificate(org: str | None = OWNER_ORG) -> CertificateIdentity:
    return CertificateIdentity(
        org_number=org,
        subject=f"CN=test,organizationIdentifier=NTRNO-{org}",
        serial_number=1,
        fingerprint_sha256="00" * 32,
        source="tls",
        seid=2,
    )


def ctx(
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    token: TokenIdentity | None = None,
    cert: CertificateIdentity | None = None,
    integ: IntegrationIdentity | None = None,
    ip: str = "192.0.2.10",
    path: str = "/",
    request_id: str = "req-1",
) -> RequestContext:
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    return RequestContext(
        request_id=request_id,
        method="GET",
        raw_path=path,
        path=path,
        query_string="",
        host="localhost",
        scheme="https",
        peer_ip=ip_address(ip),
        client_ip=ip_address(ip),
        headers=CIMultiDictProxy(CIMultiDict(list(items))),
        request=None,
        runtime=None,  # type: ignore[arg-type]
        token=token,
        certificate=cert,
        integration=integ,
    )


def creds(iid: str = INTEGRATION_ID, password: str = PASSWORD) -> dict[str, str]:
    return {"IntegrasjonId": iid, "IntegrasjonPassord": password}


class CountingHasher(PasswordHasher):
    """A PasswordHasher that counts verify() calls (the real argon2 still runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:  # type: ignore[override]
        self.calls += 1
        return super().verify(hash, password)
