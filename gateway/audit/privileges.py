"""Privilege events: the grants and integrations in force, and what a reload changes in them.

``privileges`` (at start), ``grant_added``/``grant_withdrawn`` (integration, organization,
service), ``integration_added``/``integration_removed``/``integration_password_changed``/
``integration_changed``. A password hash is never written: a keyed fingerprint shows that it
changed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import ConfigBase as Config


def privilege_state(
    cfg: Config, fp_key: bytes
) -> tuple[set[tuple[str, str, str]], dict[str, dict[str, Any]]]:
    """(grants as (integration, org, service), integrations by id with a password fingerprint)."""
    grants: set[tuple[str, str, str]] = set()
    integ: dict[str, dict[str, Any]] = {}
    for i in cfg.integrations:
        iid = i.id.lower()
        integ[iid] = {
            "authorized_org": i.authorized_org,
            "require_certificate": i.require_certificate,
            # keyed fingerprint: shows that a password changed without revealing anything
            "password_fp": hmac.new(fp_key, i.password_hash.encode(), hashlib.sha256).hexdigest()[:16],
        }
        for g in i.grants:
            for s in g.services:
                grants.add((iid, g.organization, s))
    return grants, integ


def privilege_changes(old: Config, new: Config, fp_key: bytes) -> list[dict[str, Any]]:
    og, oi = privilege_state(old, fp_key)
    ng, ni = privilege_state(new, fp_key)
    events: list[dict[str, Any]] = []
    for iid in sorted(ni.keys() - oi.keys()):
        events.append(
            {"type": "integration_added", "integration_id": iid, "authorized_org": ni[iid]["authorized_org"]}
        )
    for iid in sorted(oi.keys() - ni.keys()):
        events.append(
            {
                "type": "integration_removed",
                "integration_id": iid,
                "authorized_org": oi[iid]["authorized_org"],
            }
        )
    for iid in sorted(oi.keys() & ni.keys()):
        o, n = oi[iid], ni[iid]
        if o["password_fp"] != n["password_fp"]:
            events.append(
                {
                    "type": "integration_password_changed",
                    "integration_id": iid,
                    "authorized_org": n["authorized_org"],
                }
            )
        changed = {
            k: {"from": o[k], "to": n[k]} for k in ("authorized_org", "require_certificate") if o[k] != n[k]
        }
        if changed:
            events.append(
                {
                    "type": "integration_changed",
                    "integration_id": iid,
                    "authorized_org": n["authorized_org"],
                    "changes": changed,
                }
            )

    def owner(iid: str) -> str | None:
        return (ni.get(iid) or oi.get(iid) or {}).get("authorized_org")

    for iid, org, svc in sorted(ng - og):
        events.append(
            {
                "type": "grant_added",
                "integration_id": iid,
                "authorized_org": owner(iid),
                "organization": org,
                "service": svc,
            }
        )
    for iid, org, svc in sorted(og - ng):
        events.append(
            {
                "type": "grant_withdrawn",
                "integration_id": iid,
                "authorized_org": owner(iid),
                "organization": org,
                "service": svc,
            }
        )
    return events
