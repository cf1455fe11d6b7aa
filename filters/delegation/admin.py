"""Delegated administration: who may grant what (``decide``), and the admin API on top of it.

Rules (the seed's): only administrators grant. An organisation administrator (``admin`` on
``*``) grants and withdraws anything in the organisation. A service administrator (``admin`` on
service S) grants and withdraws only non-admin privileges on S: it cannot make administrators,
so it cannot grant further than its own service. Nobody grants to themselves. A grant seeded from
config is withdrawn by changing the config. An organisation keeps at least one administrator.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from aiohttp import web

from filters.delegation import auditview, page
from filters.delegation.config import ADMIN, ALL_SERVICES
from filters.delegation.store import LastAdmin, now_iso
from gateway import problems
from gateway.norid import mask_person_numbers
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from filters.delegation import DelegationStage
    from filters.persons import PersonsStage
    from gateway.context import RequestContext

NOT_ADMIN = problems.register("not_admin", 403, "You do not administer this organisation")
OUTSIDE_SERVICE = problems.register(
    "outside_service", 403, "A service administrator grants only within their service"
)
ADMIN_BY_ORG_ADMIN = problems.register(
    "admin_grant_not_allowed", 403, "Only an organisation administrator makes administrators"
)
SELF_GRANT = problems.register("self_grant", 403, "You cannot change your own privileges")
LAST_ADMIN = problems.register("last_admin", 409, "The organisation must keep at least one administrator")
SEEDED_GRANT = problems.register(
    "seeded_grant", 409, "This administrator is set in the gateway's configuration"
)
GRANT_INVALID = problems.register("grant_invalid", 400, "The grant is not valid")
GRANT_NOT_FOUND = problems.register("grant_not_found", 404, "No such grant")

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


class Authority:
    """What the caller administers in one organisation."""

    def __init__(self, grants: list[dict[str, Any]], ref: str):
        mine = [
            g
            for g in grants
            if g["subject"]["kind"] == "person" and g["subject"]["ref"] == ref and g["role"] == ADMIN
        ]
        self.org_admin = any(g["service"] == ALL_SERVICES for g in mine)
        self.services = {g["service"] for g in mine if g["service"] != ALL_SERVICES}

    @property
    def any(self) -> bool:
        return self.org_admin or bool(self.services)

    def visible(self, g: dict[str, Any]) -> bool:
        return self.org_admin or g["service"] in self.services


def decide(auth: Authority, caller_ref: str, role: str, service: str, subject_ref: str) -> str | None:
    """None when the caller may grant/withdraw (role, service) for the subject; else a reason."""
    if not auth.any:
        return NOT_ADMIN
    if subject_ref == caller_ref:
        return SELF_GRANT
    if auth.org_admin:
        return None
    if service not in auth.services:
        return OUTSIDE_SERVICE
    if role == ADMIN:
        return ADMIN_BY_ORG_ADMIN
    return None


async def serve_admin(
    st: DelegationStage, persons: PersonsStage, ctx: RequestContext, request: Any
) -> web.StreamResponse:
    from filters.delegation import endpoints as ep

    a = st.admin_prefix
    sub = ctx.path[len(a) :] or "/"
    s = await ep.person_session(persons, ctx)
    level = st.cfg.admin_api.min_acr
    if s is None:
        return ep.login_required(persons, ctx, level, back=a + "/")
    if not ep.check_level(st, persons, s):
        return ep.login_required(persons, ctx, level, step_up=True, back=a + "/")
    sh = ep.session_hash(s.id)
    n = await persons.store.incr(f"{persons.cfg.store.key_prefix}c:adm:{sh}", 60)
    if n > st.cfg.admin_api.requests_per_minute:
        return ep.problem(ctx, Problem(ep.ADMIN_RATE_LIMITED, headers={"Retry-After": "60"}))
    pid = s.data["pid"]
    ref = st.person_ref(pid)
    ctx.audit["admin"] = {"session": sh}
    m = ctx.method
    parts = sub.strip("/").split("/") if sub.strip("/") else []
    if m in ("POST", "DELETE", "PUT", "PATCH"):
        bad = ep.same_origin_problem(ctx)
        if bad is not None:
            return ep.problem(ctx, bad)
    if not parts and m in ("GET", "HEAD"):
        return await page.render(st, persons, ctx, ref, sh)
    if parts == ["csrf"] and m == "GET":
        return ep.json_resp(ctx, {"csrf_token": await ep.new_csrf(persons, sh), "expires_in": ep.CSRF_TTL})
    if parts == ["orgs"] and m == "GET":
        mine = await st.store.of_subject("person", ref)
        return ep.json_resp(
            ctx,
            {
                "administers": [
                    {"organization": g["organization"], "service": g["service"]}
                    for g in mine
                    if g["role"] == ADMIN
                ]
            },
        )
    if parts and parts[0] == "ui" and m == "POST" and len(parts) == 2 and parts[1] in ("grant", "withdraw"):
        return await ui_form(st, persons, ctx, request, pid, ref, sh, parts[1])
    if len(parts) >= 3 and parts[0] == "orgs" and parts[2] in ("grants", "audit"):
        org = parts[1]
        if not ep.valid_org(org):
            return ep.problem(ctx, Problem(GRANT_INVALID, detail="organisation number: 9 digits"))
        grants = await st.store.grants(org)
        auth = Authority(grants, ref)
        if not auth.any:
            st.audit_event(
                {
                    "type": "admin_refused",
                    "request_id": ctx.request_id,
                    "organization": org,
                    "reason": NOT_ADMIN,
                },
                pid,
            )
            return ep.problem(ctx, Problem(NOT_ADMIN))
        if parts[2] == "audit" and len(parts) == 3 and m == "GET":
            return await read_audit(st, ctx, org, auth, pid)
        if parts[2] == "grants" and len(parts) == 3 and m == "GET":
            return ep.json_resp(
                ctx, {"organization": org, "grants": [public(g) for g in grants if auth.visible(g)]}
            )
        if parts[2] == "grants" and len(parts) == 3 and m == "POST":
            ctype = (ctx.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return ep.problem(ctx, Problem(ep.UNSUPPORTED_MEDIA))
            if not await ep.take_csrf(persons, sh, ctx.headers.get("X-CSRF-Token")):
                return ep.problem(ctx, Problem(ep.CSRF_FAILED, internal_reason="csrf_token_invalid"))
            raw = await request.content.read(ep.MAX_JSON + 1)
            try:
                doc = json.loads(raw) if len(raw) <= ep.MAX_JSON else None
            except (ValueError, UnicodeDecodeError):
                doc = None
            if not isinstance(doc, dict):
                return ep.problem(ctx, Problem(GRANT_INVALID, detail="a JSON object of at most 4096 bytes"))
            out = await grant(st, ctx, org, auth, pid, ref, doc)
            if isinstance(out, Problem):
                return ep.problem(ctx, out)
            return ep.json_resp(
                ctx, public(out[0]), status=201 if out[1] else 200, reason="privilege_granted"
            )
        if parts[2] == "grants" and len(parts) == 4 and m == "DELETE":
            if not await ep.take_csrf(persons, sh, ctx.headers.get("X-CSRF-Token")):
                return ep.problem(ctx, Problem(ep.CSRF_FAILED, internal_reason="csrf_token_invalid"))
            p = await withdraw(st, ctx, org, auth, grants, pid, ref, parts[3])
            if p is not None:
                return ep.problem(ctx, p)
            return ep.done(ctx, web.Response(status=204), "allow", "privilege_withdrawn")
        return ep.problem(ctx, Problem(problems.METHOD_NOT_ALLOWED))
    return ep.problem(ctx, Problem(problems.NOT_FOUND))


def public(g: dict[str, Any]) -> dict[str, Any]:
    s = g["subject"]
    subj = {"person": s["display"]} if s["kind"] == "person" else {"integration": s["ref"]}
    return {
        "id": g["id"],
        "organization": g["organization"],
        "subject": subj,
        "role": g["role"],
        "service": g["service"],
        "granted_at": g.get("granted_at"),
        "basis": g.get("basis"),
        "seeded": bool(g.get("seeded")),
    }


def _subject(st: DelegationStage, doc: Any) -> tuple[str, str, str, str | None] | None:
    """(kind, ref, display, pid) of a grant's subject, or None when malformed."""
    from filters.delegation import masked

    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    if isinstance(doc.get("person"), str) and re.fullmatch(r"[0-9]{11}", doc["person"]):
        pid = doc["person"]
        return "person", st.person_ref(pid), masked(pid), pid
    if isinstance(doc.get("integration"), str) and _UUID.match(doc["integration"]):
        iid = doc["integration"].lower()
        return "integration", iid, iid, None
    return None


async def grant(
    st: DelegationStage,
    ctx: RequestContext,
    org: str,
    auth: Authority,
    pid: str,
    ref: str,
    doc: dict[str, Any],
) -> Problem | tuple[dict[str, Any], bool]:
    from filters.delegation import _audit_subject

    if set(doc) - {"subject", "role", "service", "basis"}:
        return Problem(GRANT_INVALID, detail="fields: subject, role, service, basis")
    subj = _subject(st, doc.get("subject"))
    role = doc.get("role")
    service = doc.get("service", ALL_SERVICES if role == ADMIN else None)
    basis = doc.get("basis", "delegated administration")
    if subj is None:
        return Problem(
            GRANT_INVALID, detail='subject: {"person": "<11 digits>"} or {"integration": "<uuid>"}'
        )
    if role != ADMIN and role not in st.cfg.privileges:
        return Problem(GRANT_INVALID, detail=f"role: one of {', '.join([ADMIN, *st.cfg.privileges])}")
    if not isinstance(service, str) or (service != ALL_SERVICES and service not in st.services):
        return Problem(GRANT_INVALID, detail="service: * or a service a route exposes")
    if not isinstance(basis, str) or not basis or len(basis) > 200:
        return Problem(GRANT_INVALID, detail="basis: text of at most 200 characters")
    # Free text an administrator types ("vedtak om 24917397852"): a person number in it is masked
    # before it is stored, shown or audited (red team 2, F10).
    basis = mask_person_numbers(basis)
    kind, sref, display, spid = subj
    if kind == "integration" and role == ADMIN:
        return Problem(GRANT_INVALID, detail="administrators are persons")
    why = decide(auth, ref, role, service, sref if kind == "person" else "")
    if why is not None:
        st.audit_event(
            {
                "type": "admin_refused",
                "request_id": ctx.request_id,
                "organization": org,
                "reason": why,
                "role": role,
                "service": service,
            },
            pid,
        )
        return Problem(why)
    g = {
        "id": "g-" + secrets.token_urlsafe(12),
        "organization": org,
        "subject": {"kind": kind, "ref": sref, "display": display},
        "role": role,
        "service": service,
        "granted_by": ref,
        "granted_at": now_iso(),
        "basis": basis,
        "seeded": False,
        "audit_subject": st.audit_person(spid) if spid else None,
    }
    g, new = await st.store.add(g)
    if new:
        st.audit_event(
            {
                "type": "privilege_granted",
                "request_id": ctx.request_id,
                "organization": org,
                "grant": g["id"],
                "role": role,
                "service": service,
                "subject": _audit_subject(g),
                "basis": basis,
            },
            pid,
        )
    return g, new


async def withdraw(
    st: DelegationStage,
    ctx: RequestContext,
    org: str,
    auth: Authority,
    grants: list[dict[str, Any]],
    pid: str,
    ref: str,
    gid: str,
) -> Problem | None:
    from filters.delegation import _audit_subject

    g = next((x for x in grants if x["id"] == gid), None)
    if g is None or not auth.visible(g):
        return Problem(GRANT_NOT_FOUND)
    if g.get("seeded"):
        return Problem(SEEDED_GRANT)
    why = decide(auth, ref, g["role"], g["service"], g["subject"]["ref"])
    if why == SELF_GRANT:
        why = None  # giving up one's own grant is allowed (the last-admin rule still holds)
    if why is not None:
        st.audit_event(
            {
                "type": "admin_refused",
                "request_id": ctx.request_id,
                "organization": org,
                "reason": why,
                "grant": gid,
            },
            pid,
        )
        return Problem(why)
    try:
        gone = await st.store.remove(org, gid)
    except LastAdmin:
        st.audit_event(
            {
                "type": "admin_refused",
                "request_id": ctx.request_id,
                "organization": org,
                "reason": LAST_ADMIN,
                "grant": gid,
            },
            pid,
        )
        return Problem(LAST_ADMIN)
    if gone is None:
        return Problem(GRANT_NOT_FOUND)
    st.audit_event(
        {
            "type": "privilege_withdrawn",
            "request_id": ctx.request_id,
            "organization": org,
            "grant": gid,
            "role": gone["role"],
            "service": gone["service"],
            "subject": _audit_subject(gone),
        },
        pid,
    )
    return None


async def read_audit(
    st: DelegationStage, ctx: RequestContext, org: str, auth: Authority, pid: str
) -> web.StreamResponse:
    from filters.delegation import endpoints as ep

    q = ctx.request.query
    try:
        since = auditview.parse_time(q.get("since"))
        until = auditview.parse_time(q.get("until"))
        offset = int(q.get("cursor", "0") or 0)
        limit = int(q.get("limit", str(st.cfg.admin_api.page_size)))
        if not (0 <= offset < 10**9 and 1 <= limit <= 500):
            raise ValueError("range")
    except ValueError:
        return ep.problem(
            ctx, Problem(problems.BAD_REQUEST, detail="since/until: ISO 8601; cursor, limit 1-500: integers")
        )
    service = q.get("service") or None
    caller = q.get("caller") or None
    if (service is not None and len(service) > 80) or (caller is not None and len(caller) > 80):
        return ep.problem(ctx, Problem(problems.BAD_REQUEST, detail="filter too long"))
    services = None if auth.org_admin else set(auth.services)
    audit = st.audit
    base = audit.config.resolve_path(audit.cfg.path) if audit is not None and audit.cfg.path else None
    files = auditview.trail_files(base) if base else []
    view = auditview.View(st.subject_key, org)
    # The scan reads files: off the event loop.
    records, nxt = await asyncio.to_thread(
        auditview.read,
        files,
        org,
        view,
        since=since,
        until=until,
        services=services,
        service=service,
        caller=caller,
        offset=offset,
        limit=limit,
    )
    st.audit_event(
        {
            "type": "audit_read",
            "request_id": ctx.request_id,
            "organization": org,
            "returned": len(records),
            "filters": {
                k: v
                for k, v in (
                    ("since", q.get("since")),
                    ("until", q.get("until")),
                    ("service", service),
                    ("caller", caller),
                    ("cursor", offset),
                )
                if v
            },
        },
        pid,
    )
    return ep.json_resp(
        ctx, {"organization": org, "records": records, "next_cursor": str(nxt) if nxt is not None else None}
    )


async def ui_form(
    st: DelegationStage,
    persons: PersonsStage,
    ctx: RequestContext,
    request: Any,
    pid: str,
    ref: str,
    sh: str,
    action: str,
) -> web.StreamResponse:
    from filters.delegation import endpoints as ep

    ctype = (ctx.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    raw = await request.content.read(ep.MAX_JSON + 1)
    if ctype != "application/x-www-form-urlencoded" or len(raw) > ep.MAX_JSON:
        return ep.problem(ctx, Problem(GRANT_INVALID, detail="a form"))
    try:
        form = {k: v[0] for k, v in parse_qs(raw.decode(), max_num_fields=10).items()}
    except (ValueError, UnicodeDecodeError):
        return ep.problem(ctx, Problem(GRANT_INVALID, detail="a form"))
    if not await ep.take_csrf(persons, sh, form.get("csrf")):
        return ep.problem(ctx, Problem(ep.CSRF_FAILED, internal_reason="csrf_token_invalid"))
    org = form.get("organization", "")
    if not ep.valid_org(org):
        return ep.problem(ctx, Problem(GRANT_INVALID, detail="organisation number: 9 digits"))
    grants = await st.store.grants(org)
    auth = Authority(grants, ref)
    if not auth.any:
        return ep.problem(ctx, Problem(NOT_ADMIN))
    if action == "grant":
        doc: dict[str, Any] = {
            "subject": {"person": form.get("person", "")},
            "role": form.get("role", ""),
            "service": form.get("service") or ALL_SERVICES,
        }
        if form.get("basis"):
            doc["basis"] = form["basis"]
        out: Any = await grant(st, ctx, org, auth, pid, ref, doc)
    else:
        out = await withdraw(st, ctx, org, auth, grants, pid, ref, form.get("grant", ""))
    if isinstance(out, Problem):
        return ep.problem(ctx, out)
    return ep.done(
        ctx,
        web.Response(status=303, headers={"Location": f"{st.admin_prefix}/?org={org}"}),
        "allow",
        "privilege_granted" if action == "grant" else "privilege_withdrawn",
    )


__all__ = ["Authority", "decide", "serve_admin"]
