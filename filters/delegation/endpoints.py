"""Endpoints of the delegation stage, served before routing (never proxied).

==========================================  ==================================================
``GET  <p>/parties``                        the person's parties (deleted marked, selectable)
``POST <p>/party``                          choose one: ``{"partyUuid": ...}`` (or a form)
``GET  <a>/``                               the admin page (server-rendered HTML, forms)
``GET  <a>/csrf``                           a single-use CSRF token for the JSON API
``GET  <a>/orgs``                           where the caller administers
``GET|POST <a>/orgs/{org}/grants``          list / grant (JSON)
``DELETE <a>/orgs/{org}/grants/{id}``       withdraw
``GET  <a>/orgs/{org}/audit``               the organisation's audit view
``POST <a>/ui/grant``, ``<a>/ui/withdraw``  the page's forms (303 back to the page)
==========================================  ==================================================

``<p>`` is ``persons.prefix``, ``<a>`` is ``<p><admin_api.path>``. The admin endpoints need a
login session at ``admin_api.min_acr`` (default high), are rate-limited per session, and every
state change needs a single-use CSRF token bound to the session (``X-CSRF-Token`` header or the
form's ``csrf`` field), a same-origin ``Origin``/``Sec-Fetch-Site`` when sent, and (JSON) the
``application/json`` content type, which a cross-site form cannot send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web

from filters.delegation import admin as rules
from filters.delegation import auditview, page, parties
from filters.delegation.altinn import AltinnUnavailable
from filters.delegation.store import PrivilegesUnavailable
from filters.persons.oidc import acr_rank
from filters.persons.sessions import session_hash
from filters.persons.store import StoreUnavailable
from gateway import problems
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from filters.delegation import DelegationStage
    from filters.persons import PersonsStage
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.delegation.endpoints")

CSRF_FAILED = problems.register(
    "csrf_failed", 403, "The request could not be verified; reload the page and try again"
)
ADMIN_RATE_LIMITED = problems.register("admin_rate_limited", 429, "Too many administration requests")
UNSUPPORTED_MEDIA = problems.register("unsupported_media_type", 415, "Send application/json")
_ORG = re.compile(r"^[0-9]{9}\Z")
_GRANT_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")
CSRF_TTL = 900
MAX_JSON = 4096


def done(
    ctx: RequestContext, resp: web.StreamResponse, decision: str = "allow", reason: str | None = None
) -> web.StreamResponse:
    ctx.status, ctx.decision, ctx.reason = resp.status, decision, reason
    resp.headers["X-Request-Id"] = ctx.request_id
    resp.headers["Server"] = "portvakt"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def problem(ctx: RequestContext, p: Problem) -> web.StreamResponse:
    ctx.status = p.status or 500
    ctx.decision = "deny" if ctx.status < 500 else "error"
    ctx.reason = p.log_reason
    resp = problems.render(p, ctx.request_id)
    resp.headers["Server"] = "portvakt"
    return resp


def json_resp(
    ctx: RequestContext, doc: Any, status: int = 200, reason: str | None = None
) -> web.StreamResponse:
    return done(ctx, web.json_response(doc, status=status), "allow", reason)


async def serve(
    st: DelegationStage, persons: PersonsStage, ctx: RequestContext, request: Any
) -> web.StreamResponse:
    try:
        if ctx.path == persons.prefix + "/parties" and ctx.method in ("GET", "HEAD"):
            return await list_parties(st, persons, ctx)
        if ctx.path == persons.prefix + "/party" and ctx.method == "POST":
            return await choose_party(st, persons, ctx, request)
        if ctx.path in (persons.prefix + "/parties", persons.prefix + "/party"):
            return problem(ctx, Problem(problems.METHOD_NOT_ALLOWED))
        return await rules.serve_admin(st, persons, ctx, request)
    except StoreUnavailable:
        return problem(ctx, Problem("session_store_unavailable", headers={"Retry-After": "2"}))
    except PrivilegesUnavailable:
        return problem(ctx, Problem("privileges_unavailable", headers={"Retry-After": "2"}))
    except AltinnUnavailable as e:
        log.warning("delegation: role source unavailable: %s", e)
        return problem(ctx, Problem("role_source_unavailable", headers={"Retry-After": "5"}))


async def person_session(persons: PersonsStage, ctx: RequestContext) -> Any:
    s = await persons.sessions.load(ctx.headers)
    return s if s is not None and s.data.get("pid") else None


def login_required(
    persons: PersonsStage,
    ctx: RequestContext,
    level: str | None = None,
    step_up: bool = False,
    back: str | None = None,
) -> web.StreamResponse:
    q = {"redirect": back or ctx.raw_path}
    if level:
        q["level"] = level
    login = f"{persons.prefix}/login?{urlencode(q, quote_via=quote)}"
    from filters.persons import is_navigation

    if is_navigation(ctx):
        return done(
            ctx,
            web.Response(status=302, headers={"Location": login}),
            "deny",
            "step_up_required" if step_up else "login_required",
        )
    if step_up:
        www = f'Bearer error="insufficient_user_authentication", acr_values="{level}"'
        return problem(
            ctx,
            Problem(
                "step_up_required",
                headers={"WWW-Authenticate": www, "Location": login},
                extra={"login": login, "acr_values": level},
            ),
        )
    return problem(
        ctx,
        Problem(
            "login_required",
            headers={"WWW-Authenticate": 'Bearer realm="portvakt"', "Location": login},
            extra={"login": login},
        ),
    )


# ----------------------------------------------------------------------------------- parties


async def list_parties(st: DelegationStage, persons: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    s = await person_session(persons, ctx)
    if s is None or st.altinn is None:
        return login_required(persons, ctx) if s is None else problem(ctx, Problem(problems.NOT_FOUND))
    state = await parties.load(st, persons, ctx.headers, s.data["pid"])
    assert state is not None
    ctx.audit["party"] = {"listed": len(state.parties)}
    return json_resp(
        ctx,
        {
            "parties": state.public(),
            "chosen": state.chosen,
            "fetched_at": int(state.fetched),
            "cache_seconds": int(st.cache_seconds),
        },
    )


async def choose_party(
    st: DelegationStage, persons: PersonsStage, ctx: RequestContext, request: Any
) -> web.StreamResponse:
    s = await person_session(persons, ctx)
    if s is None or st.altinn is None:
        return login_required(persons, ctx) if s is None else problem(ctx, Problem(problems.NOT_FOUND))
    bad = same_origin_problem(ctx)
    if bad is not None:
        return problem(ctx, bad)
    ctype = (ctx.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    body = await request.content.read(MAX_JSON + 1)
    if len(body) > MAX_JSON:
        return problem(ctx, Problem(problems.BAD_REQUEST, detail="Body too large"))
    uuid_ = None
    try:
        if ctype == "application/json":
            doc = json.loads(body)
            uuid_ = doc.get("partyUuid") if isinstance(doc, dict) else None
        elif ctype == "application/x-www-form-urlencoded":
            from urllib.parse import parse_qs

            form = parse_qs(body.decode(), max_num_fields=5)
            uuid_ = (form.get("partyUuid") or [None])[0]
            # A form is a "simple" request a foreign page can send (no preflight): it needs the
            # session's one-use token, as the admin page's forms do (JSON needs a preflight).
            if not await take_csrf(persons, session_hash(s.id), (form.get("csrf") or [None])[0]):
                return problem(ctx, Problem(CSRF_FAILED, internal_reason="csrf_token_invalid"))
        else:
            return problem(ctx, Problem(UNSUPPORTED_MEDIA))
    except (ValueError, UnicodeDecodeError):
        return problem(ctx, Problem(problems.BAD_REQUEST, detail="partyUuid expected"))
    if not isinstance(uuid_, str) or not uuid_ or len(uuid_) > 64:
        return problem(ctx, Problem(problems.BAD_REQUEST, detail="partyUuid expected"))
    state = await parties.load(st, persons, ctx.headers, s.data["pid"])
    assert state is not None
    p = state.find(uuid_)
    sh = session_hash(s.id)
    if p is None or not p["selectable"]:
        st.audit_event(
            {
                "type": "party_refused",
                "request_id": ctx.request_id,
                "session": sh,
                "reason": "party_not_held" if p is None else "party_not_selectable",
                **({"organization": p["org"]} if p is not None and p["org"] else {}),
            },
            s.data["pid"],
        )
        return problem(
            ctx,
            Problem(
                "party_not_held", internal_reason="party_not_held" if p is None else "party_not_selectable"
            ),
        )
    state.chosen = p["uuid"]
    await parties.save(persons, state)
    st.audit_event(
        {
            "type": "party_selected",
            "request_id": ctx.request_id,
            "session": sh,
            "organization": p["org"],
            "unit_type": p["unit_type"],
        },
        s.data["pid"],
    )
    ctx.audit["party"] = {"acting_org": p["org"]}
    if ctype == "application/x-www-form-urlencoded":
        return done(
            ctx,
            web.Response(status=303, headers={"Location": st.admin_prefix + "/"}),
            "allow",
            "party_selected",
        )
    return json_resp(
        ctx,
        {"chosen": {"partyUuid": p["uuid"], "organizationNumber": p["org"], "name": p["name"]}},
        reason="party_selected",
    )


# -------------------------------------------------------------------------------------- CSRF


def same_origin_problem(ctx: RequestContext) -> Problem | None:
    """A state change from another site: refused before anything else is read."""
    site = ctx.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return Problem(CSRF_FAILED, internal_reason="csrf_cross_site")
    origin = ctx.headers.get("Origin")
    if origin is not None and origin != f"{ctx.scheme}://{ctx.host}":
        return Problem(CSRF_FAILED, internal_reason="csrf_origin_mismatch")
    return None


def _csrf_key(persons: PersonsStage, token: str) -> str:
    return f"{persons.cfg.store.key_prefix}csrf:{hashlib.sha256(token.encode()).hexdigest()}"


async def new_csrf(persons: PersonsStage, sh: str) -> str:
    token = secrets.token_urlsafe(32)
    await persons.store.set(_csrf_key(persons, token), sh.encode(), CSRF_TTL)
    return token


async def take_csrf(persons: PersonsStage, sh: str, token: str | None) -> bool:
    """One use: a replayed token finds nothing; a token of another session does not match."""
    if not token or len(token) > 100:
        return False
    bound = await persons.store.take(_csrf_key(persons, token))
    return bound is not None and hmac.compare_digest(bound, sh.encode())


def check_level(st: DelegationStage, persons: PersonsStage, s: Any) -> bool:
    return acr_rank(s.data.get("acr"), persons.cfg.provider.eidas_high_as_high) >= acr_rank(
        st.cfg.admin_api.min_acr
    )


def valid_org(org: str) -> bool:
    return bool(_ORG.match(org))


def valid_grant_id(gid: str) -> bool:
    return bool(_GRANT_ID.match(gid))


__all__ = [
    "serve",
    "done",
    "problem",
    "json_resp",
    "new_csrf",
    "take_csrf",
    "same_origin_problem",
    "page",
    "auditview",
]
