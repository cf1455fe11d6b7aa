"""The person's parties and the chosen one, kept beside the login session.

Key ``<persons store prefix>party:<session hash>``, sealed with the session's own data key (only
the browser's cookie holds it): ``{"fetched": t, "parties": [...], "chosen": uuid | null}``. The
list is fetched from Altinn again once older than ``altinn.cache_seconds``; a route that needs a
party re-checks the choice against the (fresh enough) list on every request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filters.persons.cookies import open_blob, seal_blob
from filters.persons.sessions import session_hash

if TYPE_CHECKING:  # pragma: no cover
    from filters.delegation import DelegationStage
    from filters.persons import PersonsStage


@dataclass(slots=True)
class PartyState:
    key: str
    dek: bytes
    aad: bytes
    fetched: float
    parties: list[dict[str, Any]]
    chosen: str | None

    def find(self, party_uuid: str | None) -> dict[str, Any] | None:
        return next((p for p in self.parties if p["uuid"] == party_uuid), None) if party_uuid else None

    def public(self) -> list[dict[str, Any]]:
        return [
            {
                "partyUuid": p["uuid"],
                "name": p["name"],
                "organizationNumber": p["org"],
                "type": p["type"],
                "unitType": p["unit_type"],
                "parentOrganizationNumber": p["parent"],
                "isDeleted": p["deleted"],
                "selectable": p["selectable"],
                "chosen": p["uuid"] == self.chosen,
            }
            for p in self.parties
        ]


async def load(
    st: DelegationStage, persons: PersonsStage, headers: Any, pid: str, *, fresh: bool = True
) -> PartyState | None:
    """The party state of the request's session: fetched from Altinn when missing or stale
    (``fresh``), else as stored (``fresh=False``: never calls Altinn). None without a session
    ticket. Raises AltinnUnavailable, StoreUnavailable."""
    t = persons.sessions.ticket_from_cookie(headers)
    if t is None:
        return None
    sid, dek = t
    sh = session_hash(sid)
    key = f"{persons.cfg.store.key_prefix}party:{sh}"
    aad = key.encode()
    blob = await persons.store.get(key)
    doc = None
    if blob is not None:
        raw = open_blob(dek, blob, aad)
        doc = json.loads(raw) if raw is not None else None
    now = time.time()
    if doc is not None and (not fresh or now - doc["fetched"] < st.cache_seconds):
        return PartyState(key, dek, aad, doc["fetched"], doc["parties"], doc.get("chosen"))
    if doc is None and not fresh:
        return PartyState(key, dek, aad, 0.0, [], None)  # nothing fetched, nothing chosen
    assert st.altinn is not None
    parties = await st.altinn.parties(pid)
    state = PartyState(key, dek, aad, now, parties, doc.get("chosen") if doc else None)
    await save(persons, state)
    return state


async def save(persons: PersonsStage, state: PartyState) -> None:
    doc = {"fetched": state.fetched, "parties": state.parties, "chosen": state.chosen}
    blob = seal_blob(state.dek, json.dumps(doc, separators=(",", ":")).encode(), state.aad)
    await persons.store.set(state.key, blob, persons.cfg.absolute_timeout_seconds + 60)
