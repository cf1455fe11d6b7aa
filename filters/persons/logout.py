"""Logging out: the confirmation page and its CSRF token, POST /logout (RP-initiated logout at the
provider), the provider's return, and front-channel logout."""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from filters.persons import pages
from filters.persons.cookies import cookie_values
from filters.persons.oidc import ProviderUnavailable, state_hash
from filters.persons.sessions import session_hash, sid_index_key
from filters.persons.store import StoreUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from filters.persons import PersonsStage
    from gateway.context import RequestContext
from filters.persons.responses import _done, _redirect

log = logging.getLogger("portvakt.persons.endpoints")


def logout_csrf_token(session_id: str) -> str:
    """The per-session token of the logout form (the session id itself never leaves the server)."""
    return hashlib.sha256(b"portvakt-logout-csrf|" + session_id.encode()).hexdigest()


def same_origin(ctx: RequestContext) -> bool | None:
    """True/False when the browser says where the request comes from, None when it says nothing."""
    sfs = ctx.headers.get("Sec-Fetch-Site")
    if sfs is not None:
        return sfs in ("same-origin", "none")
    origin = ctx.headers.get("Origin")
    if origin is not None:
        return origin.lower() == f"{ctx.scheme}://{ctx.host}"
    return None


async def logout_confirm(
    st: PersonsStage, ctx: RequestContext, status: int = 200, reason: str | None = None
) -> web.StreamResponse:
    """GET: a page with the logout button (a POST form); nothing is ended by a GET."""
    s = await st.sessions.load(ctx.headers, touch=False)
    token = logout_csrf_token(s.id) if s is not None else ""
    try:  # the POST may redirect to the OP (end_session_method get): form-action must allow it
        end = (await st.provider.ensure_metadata()).get("end_session_endpoint")
    except ProviderUnavailable:
        end = None
    u = urlsplit(end) if isinstance(end, str) else None
    resp = pages.logout_confirm_page(
        f"{st.prefix}/logout",
        token,
        status,
        f"{u.scheme}://{u.netloc}" if u is not None and u.netloc else None,
    )
    return _done(ctx, resp, "allow" if status < 400 else "deny", reason or "logout_confirm")


async def _form_token(ctx: RequestContext) -> str | None:
    ctype = ctx.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return None
    try:
        body = await ctx.request.read()
    except Exception:  # noqa: BLE001 - an unreadable body is just no token
        return None
    if len(body) > 4096:
        return None
    from urllib.parse import parse_qs

    vals = parse_qs(body.decode("latin-1"), max_num_fields=8).get("csrf")
    return vals[0] if vals and len(vals) == 1 else None


async def logout(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    cfg = st.cfg
    pfx = cfg.store.key_prefix
    s = await st.sessions.load(ctx.headers, touch=False)
    # Logout CSRF: a cross-site page must not end the person's session (nor, through the OP, SSO).
    # Allowed: the browser says same-origin, or the form carries this session's token.
    same = same_origin(ctx)
    token = await _form_token(ctx)
    token_ok = s is not None and token is not None and secrets.compare_digest(token, logout_csrf_token(s.id))
    if same is False or (same is None and not token_ok):
        return await logout_confirm(st, ctx, 403, "logout_csrf_refused")
    id_token = None
    if s is not None:
        id_token = s.data.get("id_token")
        await st.sessions.end(s)  # local session first, before the browser leaves
        scopes = set((s.data.get("scope") or " ".join(cfg.provider.scopes)).split())
        revoke = cfg.revoke_on_logout == "always" or (
            cfg.revoke_on_logout == "auto" and scopes - {"openid", "profile"}
        )
        revoked = False
        if revoke and s.data.get("refresh_token"):
            revoked = await st.provider.revoke(s.data["refresh_token"])
        st.audit_event(
            {
                "type": "logout_rp",
                "request_id": ctx.request_id,
                "session": session_hash(s.id),
                "revoked": revoked,
            },
            s.data.get("pid"),
        )
    clear = st.sessions.set_cookie_header(None)
    try:
        md = await st.provider.ensure_metadata()
    except ProviderUnavailable:
        md = {}
    end = md.get("end_session_endpoint")
    if not isinstance(end, str):
        return _done(ctx, _redirect(cfg.after_logout_path, [clear]), "allow", "logout_local")
    state = secrets.token_urlsafe(24)
    await st.store.set(f"{pfx}o:{state_hash(state)}", b"1", cfg.login_attempt_seconds)
    fields = {
        "client_id": cfg.provider.client_id,
        "state": state,
        "post_logout_redirect_uri": cfg.post_logout_redirect_uri
        or f"{ctx.scheme}://{ctx.host}{st.prefix}/logout/callback",
    }
    if id_token:
        fields["id_token_hint"] = id_token
    if cfg.provider.end_session_method == "get":  # for OPs without POST support (puts the hint in URLs)
        resp = _redirect(end + ("&" if "?" in end else "?") + urlencode(fields), [clear])
        return _done(ctx, resp, "allow", "logout_rp")
    u = urlsplit(end)
    resp = pages.post_form_page(end, fields, f"{u.scheme}://{u.netloc}")
    resp.headers.add("Set-Cookie", clear)
    return _done(ctx, resp, "allow", "logout_rp")


async def logout_callback(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    state = ctx.request.query.get("state")
    ok = False
    if state and len(state) < 512:
        ok = await st.store.take(f"{st.cfg.store.key_prefix}o:{state_hash(state)}") is not None
    # A wrong or missing state lands on the same page with nothing said: no oracle, no error leak.
    return _done(
        ctx,
        _redirect(st.cfg.after_logout_path),
        "allow" if ok else "deny",
        "logout_completed" if ok else "logout_state_mismatch",
    )


async def frontchannel(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    q = ctx.request.query
    iss, sid = q.get("iss"), q.get("sid")
    cookie_seen = bool(cookie_values(ctx.headers.getall("Cookie", ()), st.cfg.cookie_name))
    resp = web.Response(status=200, text="", content_type="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors " + " ".join(
        st.provider.frame_ancestors()
    )
    issuer = st.cfg.provider.issuer
    if not iss or not sid or len(sid) > 256 or iss.rstrip("/") != issuer.rstrip("/"):
        return _done(ctx, resp, "deny", "frontchannel_ignored")
    try:
        ended = await st.sessions.end_by_sid(issuer, sid)
    except StoreUnavailable:
        # Accepted: retried in the background (up to 10 min) so the logout still happens.
        st.retry_frontchannel(issuer, sid, ctx.request_id)
        resp.set_status(202)
        return _done(ctx, resp, "error", "frontchannel_store_unavailable")
    if ended:
        st.audit_event(
            {
                "type": "logout_frontchannel",
                "request_id": ctx.request_id,
                "op_session": sid_index_key(issuer, sid)[:32],
                "sessions": [session_hash(i) for i in ended],
                "cookie_seen": cookie_seen,
            }
        )
    ctx.audit["persons"] = {"cookie_seen": cookie_seen, "ended": len(ended)}
    return _done(ctx, resp, "allow", "logout_frontchannel" if ended else "frontchannel_nothing")
