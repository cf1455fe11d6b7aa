"""The organisation's own audit view: the records of the hash-chained trail that concern one
organisation, person ids re-pseudonymised per organisation (the trail's pseudonym never leaves,
the sealed pid never leaves), filtered by time, service and caller, paginated.

A record concerns organisation O when O is its target org, the caller's (integration, token or
certificate) org, the org a person acted for (``facts.party.acting_org``), the org whose grant a
``privilege:`` route checked, or the ``organization`` of a privilege/audit event. The
``request_completed`` half of a strict-durability request follows its ``request``.
The files are scanned on each call (all workers' chains and their rotated files); trails too
large for that are read with ``portvakt audit query``.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import hmac
import json
import os
import re
from typing import Any

from gateway.audit.cli import concerns
from gateway.audit.sinks import rotated_files

_PSEUDO_IN_PATH = re.compile(r"~p:([0-9a-f]{32})")
_WORKER = re.compile(r"\.w\d+\Z")


def trail_files(base: str) -> list[str]:
    out: list[str] = []
    for p in [base] + sorted(g for g in glob.glob(glob.escape(base) + ".w*") if _WORKER.search(g)):
        out += rotated_files(p)
        if os.path.exists(p):
            out.append(p)
    return out


def org_concerns(rec: dict[str, Any], org: str) -> bool:
    if rec.get("organization") == org and str(rec.get("type", "")).startswith(
        ("privilege_", "audit_read", "party_", "admin_refused")
    ):
        return True
    facts = rec.get("facts") or {}
    if (facts.get("party") or {}).get("acting_org") == org or (facts.get("privilege") or {}).get(
        "organization"
    ) == org:
        return True
    return concerns(rec, org)


class View:
    def __init__(self, key: bytes, org: str):
        self.key = hmac.new(key, b"portvakt-audit-view|" + org.encode(), hashlib.sha256).digest()

    def pseudo(self, trail_pseudonym: str) -> str:
        return hmac.new(self.key, trail_pseudonym.encode(), hashlib.sha256).hexdigest()[:16]

    def scrub(self, v: Any) -> Any:
        if isinstance(v, dict):
            if "pseudonym" in v and isinstance(v["pseudonym"], str):
                return {"pseudonym": self.pseudo(v["pseudonym"])}  # "sealed" never leaves
            return {k: self.scrub(x) for k, x in v.items() if k not in ("mac", "prev", "seq")}
        if isinstance(v, list):
            return [self.scrub(x) for x in v]
        if isinstance(v, str) and "~p:" in v:
            return _PSEUDO_IN_PATH.sub(lambda m: "~p:" + self.pseudo(m.group(1)), v)
        return v


def _time(s: Any) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def parse_time(s: str | None) -> dt.datetime | None:
    """Raises ValueError on a malformed value (the caller answers 400)."""
    if s is None or s == "":
        return None
    t = _time(s)
    if t is None or len(s) > 40:
        raise ValueError("not an ISO 8601 time")
    return t


def read(
    files: list[str],
    org: str,
    view: View,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    services: set[str] | None,
    service: str | None,
    caller: str | None,
    offset: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of the org's records (oldest first) and the next offset (None at the end)."""
    matched: set[Any] = set()  # request ids (as the records hold them)
    out: list[dict[str, Any]] = []
    n = 0
    for path in files:
        try:
            f = open(path, "rb")
        except OSError:
            continue
        with f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                if rec.get("type") == "request_completed":
                    if rec.get("request_id") not in matched:
                        continue
                else:
                    if not org_concerns(rec, org):
                        continue
                    t = _time(rec.get("time"))
                    if t is None or (since is not None and t < since) or (until is not None and t >= until):
                        continue
                    svc = rec.get("service")
                    if services is not None and svc not in services:
                        continue
                    if service is not None and svc != service:
                        continue
                    if caller is not None and caller not in _callers(rec, view):
                        continue
                    if rec.get("type") == "request":
                        matched.add(rec.get("request_id"))
                if n >= offset:
                    if len(out) >= limit:
                        return out, n
                    out.append(view.scrub(rec))
                n += 1
    return out, None


def _callers(rec: dict[str, Any], view: View) -> set[str]:
    c = rec.get("caller") or {}
    out = {str(c[k]) for k in ("integration_id", "consumer_org", "certificate_org") if c.get(k)}
    for p in (c.get("person"), rec.get("person")):
        if isinstance(p, dict) and isinstance(p.get("pseudonym"), str):
            out.add(view.pseudo(p["pseudonym"]))
    return out
