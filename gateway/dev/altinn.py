"""Fake Altinn 3 (and the Maskinporten token endpoint in front of it) for tests and the demo.

Speaks the shapes of ``research/persons-login.md`` §a.7:

- ``POST /maskinporten/token``: JWT bearer grant; the client assertion must verify against the
  registered public key (RS256), carry ``aud`` == ``<base>/maskinporten/`` and the scope
  ``altinn:accessmanagement/authorizedparties.resourceowner``; answers an opaque access token.
- ``GET /authentication/api/v1/exchange/maskinporten``: Bearer <Maskinporten token> -> an Altinn
  token (text).
- ``POST /accessmanagement/api/v1/resourceowner/authorizedparties``: Bearer <Altinn token>, JSON
  ``{"type": "urn:altinn:person:identifier-no", "value": pid}`` -> an array of
  ``AuthorizedPartyExternal`` (subunits one level down).

Switches for tests: ``down`` (503 everywhere), ``counts`` (calls per endpoint), ``parties`` (pid
-> list). ``python -m gateway.dev.altinn --port N --client-public-key PEM`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from gateway.dev.server import LocalAppServer

SCOPE = "altinn:accessmanagement/authorizedparties.resourceowner"
DEMO_PID = "24917397852"
# A second synthetic person (Tenor: month + 80) who may act for 910000005 only: the one an
# administrator grants to in the README's "Try it" walk-through.
DEMO_PID_2 = "14859050000"


def party(
    org: str,
    name: str,
    unit: str = "AS",
    *,
    deleted: bool = False,
    no_access: bool = False,
    subunits: list[dict[str, Any]] | None = None,
    roles: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "partyUuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"altinn-org:{org}")),
        "name": name,
        "organizationNumber": org,
        "personId": None,
        "partyId": int(org[:8]),
        "type": "Organization",
        "unitType": unit,
        "isDeleted": deleted,
        "onlyHierarchyElementWithNoAccess": no_access,
        "authorizedResources": [],
        "authorizedRoles": roles if roles is not None else ["DAGL"],
        "authorizedInstances": [],
        "subunits": subunits or [],
    }


def person_party(pid: str, name: str) -> dict[str, Any]:
    return {
        "partyUuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"altinn-person:{pid}")),
        "name": name,
        "organizationNumber": None,
        "personId": pid,
        "partyId": 5000000,
        "type": "Person",
        "unitType": None,
        "isDeleted": False,
        "onlyHierarchyElementWithNoAccess": False,
        "authorizedResources": [],
        "authorizedRoles": [],
        "authorizedInstances": [],
        "subunits": [],
    }


def demo_parties(pid: str = DEMO_PID) -> list[dict[str, Any]]:
    """Two organisations (the first with two sub-units, the second's parent only for viewing),
    and a deleted one."""
    return [
        person_party(pid, "KARI NORDMANN"),
        party(
            "910000005",
            "ØSTRE BYGD KOMMUNE",
            "KOMM",
            subunits=[
                party("910000013", "ØSTRE BYGD KOMMUNE SKOLEETATEN", "BEDR"),
                party("910000021", "ØSTRE BYGD KOMMUNE HELSE", "BEDR"),
            ],
        ),
        party(
            "920000000",
            "VESTRE KONSERN AS",
            "AS",
            no_access=True,
            subunits=[
                party("920000019", "VESTRE KONSERN AS AVD BERGEN", "BEDR"),
            ],
        ),
        party("930000004", "NEDLAGT AS", "AS", deleted=True),
    ]


def colleague_parties(pid: str = DEMO_PID_2) -> list[dict[str, Any]]:
    """The second demo person: themself and Østre Bygd kommune (no sub-units)."""
    return [person_party(pid, "OLA NORDMANN"), party("910000005", "ØSTRE BYGD KOMMUNE", "KOMM")]


class FakeAltinn(LocalAppServer):
    def __init__(
        self,
        client_public_key: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        parties: dict[str, list[dict[str, Any]]] | None = None,
    ):
        self.host, self.port = host, port
        self.public_key = client_public_key
        self.parties: dict[str, list[dict[str, Any]]] = (
            parties if parties is not None else {DEMO_PID: demo_parties(), DEMO_PID_2: colleague_parties()}
        )
        self.down = False
        self.counts: dict[str, int] = {"token": 0, "exchange": 0, "parties": 0}
        self.requests: list[dict[str, Any]] = []
        self._mp: dict[str, float] = {}
        self._altinn: dict[str, float] = {}
        self._jtis: set[str] = set()
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base + "/maskinporten/token"

    @property
    def audience(self) -> str:
        return self.base + "/maskinporten/"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/maskinporten/token", self.h_token)
        app.router.add_get("/authentication/api/v1/exchange/maskinporten", self.h_exchange)
        app.router.add_post("/accessmanagement/api/v1/resourceowner/authorizedparties", self.h_parties)
        return app

    def _bearer(self, request: web.Request, table: dict[str, float]) -> bool:
        auth = request.headers.get("Authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else ""
        return table.get(tok, 0) > time.time()

    async def h_token(self, request: web.Request) -> web.Response:
        self.counts["token"] += 1
        if self.down:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                self.public_key,
                algorithms=["RS256"],
                audience=self.audience,
                options={"require": ["exp", "iat", "jti", "iss"]},
            )
        except jwt.PyJWTError:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if claims.get("scope") != SCOPE or claims["jti"] in self._jtis or claims["exp"] - claims["iat"] > 120:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self._jtis.add(claims["jti"])
        tok = secrets.token_urlsafe(32)
        self._mp[tok] = time.time() + 120
        return web.json_response(
            {"access_token": tok, "token_type": "Bearer", "expires_in": 120, "scope": SCOPE}
        )

    async def h_exchange(self, request: web.Request) -> web.Response:
        self.counts["exchange"] += 1
        if self.down:
            return web.Response(status=503)
        if not self._bearer(request, self._mp):
            return web.Response(status=401)
        tok = secrets.token_urlsafe(32)
        self._altinn[tok] = time.time() + 1800
        return web.Response(text=tok, content_type="text/plain")

    async def h_parties(self, request: web.Request) -> web.Response:
        self.counts["parties"] += 1
        if self.down:
            return web.Response(status=503)
        if not self._bearer(request, self._altinn):
            return web.Response(status=401)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"title": "bad json"}, status=400)
        self.requests.append({"query": dict(request.query), "body": body})
        if (
            not isinstance(body, dict)
            or body.get("type") != "urn:altinn:person:identifier-no"
            or not isinstance(body.get("value"), str)
        ):
            return web.json_response({"title": "unsupported type"}, status=400)
        return web.json_response(self.parties.get(body["value"], []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.dev.altinn", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8490)
    ap.add_argument(
        "--client-public-key", required=True, help="PEM public key of the gateway's Maskinporten client"
    )
    a = ap.parse_args(argv)
    with open(a.client_public_key, "rb") as f:
        pub = serialization.load_pem_public_key(f.read())

    async def run() -> None:
        fake = await FakeAltinn(pub, port=a.port).start()
        print(f"fake Altinn on {fake.base} (token {fake.token_url})", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
