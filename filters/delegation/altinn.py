"""Role source: Altinn 3 *authorized parties*, called as a resource owner.

1. Maskinporten token: JWT bearer grant (RFC 7523) with a client assertion signed RS256 by
   ``altinn.maskinporten.key_file`` for ``scope``; kept until shortly before it expires.
2. Exchanged for an Altinn token: ``GET <base>/authentication/api/v1/exchange/maskinporten``.
3. ``POST <base>/accessmanagement/api/v1/resourceowner/authorizedparties?includeAltinn2=false
   &includeAuthorizedResourcesThroughRoles=false`` with ``{"type":
   "urn:altinn:person:identifier-no", "value": <pid>}``; the answer is a JSON array of
   ``AuthorizedPartyExternal`` (subunits one level down).

``parties(pid)`` returns the flattened list the gateway keeps (``Party`` dicts: uuid, name, org,
type, unit_type, parent, deleted, selectable, roles). A person party's ``personId`` is never
kept. Anything but a well-formed 200 raises ``AltinnUnavailable`` (routes that need a party
answer 503; the person's own routes do not ask Altinn).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from typing import Any

import aiohttp
import jwt

from filters.delegation.config import AltinnConfig

log = logging.getLogger("portvakt.delegation.altinn")

PARTIES_PATH = "/accessmanagement/api/v1/resourceowner/authorizedparties"
EXCHANGE_PATH = "/authentication/api/v1/exchange/maskinporten"
_MAX_PARTIES = 500


class AltinnUnavailable(Exception):
    """Maskinporten or Altinn did not give a usable answer."""


def _party(p: Any, parent: str | None) -> dict[str, Any] | None:
    if not isinstance(p, dict) or not isinstance(p.get("partyUuid"), str):
        return None
    org = p.get("organizationNumber")
    ptype: str = p["type"] if isinstance(p.get("type"), str) else ""
    org = org if isinstance(org, str) and org.isdigit() and len(org) == 9 else None
    deleted = p.get("isDeleted") is True
    no_access = p.get("onlyHierarchyElementWithNoAccess") is True
    roles = [r for r in (p.get("authorizedRoles") or []) if isinstance(r, str)][:50]
    return {
        "uuid": p["partyUuid"][:64],
        "name": str(p.get("name") or "")[:200],
        "org": org,
        "type": ptype[:32],
        "unit_type": str(p.get("unitType") or "")[:16] or None,
        "parent": parent,
        "deleted": deleted,
        "selectable": ptype == "Organization" and org is not None and not deleted and not no_access,
        "roles": roles,
    }


def flatten(doc: Any) -> list[dict[str, Any]]:
    """Altinn's array (with one level of subunits) as one flat list; malformed entries dropped."""
    if not isinstance(doc, list):
        raise AltinnUnavailable("authorized parties: not a JSON array")
    out: list[dict[str, Any]] = []
    for p in doc[:_MAX_PARTIES]:
        top = _party(p, None)
        if top is None:
            continue
        out.append(top)
        for s in (p.get("subunits") or [])[:_MAX_PARTIES] if isinstance(p.get("subunits"), list) else []:
            sub = _party(s, top["org"])
            if sub is not None:
                out.append(sub)
    return out


class AltinnClient:
    def __init__(self, cfg: AltinnConfig, resolve: Any):
        self.cfg = cfg
        mp = cfg.maskinporten
        with open(resolve(mp.key_file), "rb") as f:
            self._key_pem = f.read()
        self._ssl: Any = ssl.create_default_context(cafile=resolve(cfg.ca_file)) if cfg.ca_file else None
        self._session: aiohttp.ClientSession | None = None
        self._altinn_token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()
        self._error: str | None = None
        self.calls = 0

    async def start(self) -> None:
        t = self.cfg.timeout_seconds
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=t, connect=t))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def readiness(self) -> str:
        return "ok" if self._error is None else f"fallback: {self._error}"

    def _assertion(self) -> str:
        mp = self.cfg.maskinporten
        now = int(time.time())
        claims = {
            "aud": mp.audience,
            "iss": mp.client_id,
            "scope": mp.scope,
            "iat": now,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
        }
        headers = {"kid": mp.key_id} if mp.key_id else None
        return jwt.encode(claims, self._key_pem, algorithm="RS256", headers=headers)

    async def _token(self) -> str:
        hit = self._altinn_token
        if hit is not None and hit[1] > time.time():
            return hit[0]
        async with self._lock:
            hit = self._altinn_token
            if hit is not None and hit[1] > time.time():
                return hit[0]
            assert self._session is not None
            form = {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": self._assertion(),
            }
            async with self._session.post(self.cfg.maskinporten.token_url, data=form, ssl=self._ssl) as r:
                if r.status != 200:
                    raise AltinnUnavailable(f"maskinporten token: HTTP {r.status}")
                doc = await r.json(content_type=None)
            mp_token, exp = doc.get("access_token"), doc.get("expires_in", 120)
            if not isinstance(mp_token, str) or not isinstance(exp, (int, float)):
                raise AltinnUnavailable("maskinporten token: malformed answer")
            async with self._session.get(
                self.cfg.base_url + EXCHANGE_PATH,
                ssl=self._ssl,
                headers={"Authorization": f"Bearer {mp_token}"},
            ) as r:
                if r.status != 200:
                    raise AltinnUnavailable(f"altinn exchange: HTTP {r.status}")
                token = (await r.text()).strip().strip('"')
            if not token or len(token) > 8192:
                raise AltinnUnavailable("altinn exchange: malformed answer")
            self._altinn_token = (token, time.time() + max(5.0, min(float(exp), 1800.0) - 30))
            return token

    async def parties(self, pid: str) -> list[dict[str, Any]]:
        """The person's parties, flattened. Raises AltinnUnavailable."""
        if self._session is None:
            raise AltinnUnavailable("not started")
        try:
            for attempt in (1, 2):
                token = await self._token()
                self.calls += 1
                q = {
                    "includeAltinn2": "true" if self.cfg.include_altinn2 else "false",
                    "includeAuthorizedResourcesThroughRoles": "false",
                }
                async with self._session.post(
                    self.cfg.base_url + PARTIES_PATH,
                    params=q,
                    ssl=self._ssl,
                    json={"type": "urn:altinn:person:identifier-no", "value": pid},
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                ) as r:
                    if r.status == 401 and attempt == 1:
                        self._altinn_token = None  # expired or revoked early: one fresh exchange
                        continue
                    if r.status != 200:
                        raise AltinnUnavailable(f"authorized parties: HTTP {r.status}")
                    if r.content_length is not None and r.content_length > 4 * 1024 * 1024:
                        raise AltinnUnavailable("authorized parties: answer too large")
                    doc = await r.json(content_type=None)
                out = flatten(doc)
                self._error = None
                return out
            raise AltinnUnavailable("authorized parties: unauthorized")
        except AltinnUnavailable as e:
            self._error = str(e)[:80]
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as e:
            self._error = type(e).__name__
            raise AltinnUnavailable(type(e).__name__) from None
