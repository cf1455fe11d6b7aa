"""The login endpoints under ``persons.prefix`` (default ``/portvakt``), served before routing.

=================================  ===========================================================
``GET  <p>/login``                 start a login: ``redirect`` (relative), ``level`` (acr),
                                   ``locale`` (ui_locales, allow-listed), ``prompt=login``
``GET  <p>/callback``              the OP's answer: state, RFC 9207 iss, code -> session
``GET  <p>/logout``                a confirmation page with a POST form (no state change)
``POST <p>/logout``                end the local session, then RP-initiated logout (POST form);
                                   same-origin only (``Sec-Fetch-Site``/``Origin``) or the
                                   session's CSRF token from the confirmation page
``GET  <p>/logout/callback``       back from the OP: state checked, then ``after_logout_path``
``GET  <p>/logout/frontchannel``   the OP ends a session: ``iss`` + ``sid``, no cookie needed
``GET  <p>/session``               the session's times and level for a single-page app
``POST <p>/session/refresh``       refresh the tokens now
``GET  <p>/auth?level=``           forward-auth for another proxy: 204 + identity headers, 401, 403
=================================  ===========================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web

from filters.issuers import ACR_RANKS
from filters.persons import pages
from filters.persons.cookies import cookie_values
from filters.persons.logout import (
    frontchannel,
    logout,
    logout_callback,
    logout_confirm,
    same_origin,
)
from filters.persons.oidc import (
    IdTokenInvalid,
    ProviderRefused,
    ProviderUnavailable,
    acr_rank,
    state_hash,
    verifier_and_challenge,
)
from filters.persons.redirects import safe_redirect
from filters.persons.responses import _done, _problem, _redirect
from filters.persons.sessions import RefreshFailed, session_hash, sid_index_key
from filters.persons.store import StoreUnavailable
from gateway import problems
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from filters.persons import PersonsStage
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.persons.endpoints")

_BINDING_LEN = 43  # token_urlsafe(32)
CROSS_SITE_REFUSED = problems.register("cross_site_refused", 403, "Cross-site request refused")


async def serve(st: PersonsStage, ctx: RequestContext, request: Any) -> web.StreamResponse:
    sub = ctx.path[len(st.prefix) :]
    m = ctx.method
    try:
        if sub == "/login" and m in ("GET", "HEAD"):
            return await login(st, ctx)
        if sub == "/callback" and m in ("GET", "HEAD"):
            return await callback(st, ctx)
        if sub == "/logout" and m in ("GET", "HEAD"):
            return await logout_confirm(st, ctx)
        if sub == "/logout" and m == "POST":
            return await logout(st, ctx)
        if sub == "/logout/callback" and m in ("GET", "HEAD"):
            return await logout_callback(st, ctx)
        if sub == "/logout/frontchannel" and m in ("GET", "HEAD"):
            return await frontchannel(st, ctx)
        if sub == "/session" and m in ("GET", "HEAD"):
            return await session_info(st, ctx)
        if sub == "/session/refresh" and m == "POST":
            if same_origin(ctx) is False:  # another site cannot spend the person's refresh token
                return _problem(
                    ctx, Problem(CROSS_SITE_REFUSED, internal_reason="session_refresh_cross_site")
                )
            return await session_info(st, ctx, refresh=True)
        if sub == "/auth" and m in ("GET", "HEAD"):
            return await forward_auth(st, ctx)
    except StoreUnavailable:
        if sub == "/logout/frontchannel":
            raise
        return _problem(ctx, Problem("session_store_unavailable", headers={"Retry-After": "2"}))
    except ProviderUnavailable as e:
        log.warning("persons: provider unavailable: %s", e)
        return _done(
            ctx,
            pages.error_page(
                503,
                "Innloggingstjenesten svarer ikke / The login service is unavailable",
                ctx.request_id,
                f"{st.prefix}/login",
            ),
            "error",
            "login_provider_unavailable",
        )
    return _problem(ctx, Problem(problems.NOT_FOUND))


# --------------------------------------------------------------------------------------- login


def _binding(ctx: RequestContext) -> tuple[str, bool]:
    """The browser's login-binding value (reused across tabs) and whether it is new."""
    vals = cookie_values(ctx.headers.getall("Cookie", ()), "__Host-portvakt-login")
    if (
        len(vals) == 1
        and len(vals[0]) == _BINDING_LEN
        and vals[0].replace("-", "").replace("_", "").isalnum()
    ):
        return vals[0], False
    return secrets.token_urlsafe(32), True


def _bhash(binding: str) -> str:
    return hashlib.sha256(b"portvakt-login|" + binding.encode()).hexdigest()


def _redirect_uri(st: PersonsStage, ctx: RequestContext) -> str:
    return st.cfg.redirect_uri or f"{ctx.scheme}://{ctx.host}{st.prefix}/callback"


async def login(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    cfg = st.cfg
    q = ctx.request.query
    target = safe_redirect(q.get("redirect"), st.allowed_redirect_hosts)
    level = q.get("level")
    acr = (
        level
        if level in ACR_RANKS
        else {"high": "idporten-loa-high", "substantial": "idporten-loa-substantial"}.get(
            level or "", cfg.provider.acr_values_default
        )
    )
    from filters.persons import canonical_acr

    acr = canonical_acr(acr)
    locale = q.get("locale")
    locale = locale if locale in st.locales else None
    prompt = "login" if q.get("prompt") == "login" else None
    binding, new_binding = _binding(ctx)
    bh = _bhash(binding)
    store = st.store
    pfx = cfg.store.key_prefix
    # Login-loop guard: per browser binding and per client address.
    n1 = await store.incr(f"{pfx}c:loop:{bh}", cfg.login_loop_window_seconds)
    n2 = await store.incr(f"{pfx}c:loopip:{ctx.client_ip}", cfg.login_loop_window_seconds)
    if n1 > cfg.login_loop_limit or n2 > cfg.login_loop_limit * 20:
        st.audit_event({"type": "login_failure", "reason": "login_loop", "request_id": ctx.request_id})
        resp = pages.error_page(429, "For mange innloggingsforsøk / Too many login attempts", ctx.request_id)
        resp.headers["Retry-After"] = str(int(cfg.login_loop_window_seconds))
        return _done(ctx, resp, "deny", "login_loop")
    opened = await store.incr(f"{pfx}c:open:{bh}", cfg.login_attempt_seconds)
    if opened > cfg.max_open_attempts:
        resp = pages.error_page(429, "For mange åpne innlogginger / Too many open logins", ctx.request_id)
        return _done(ctx, resp, "deny", "too_many_open_logins")
    cookies: list[str] = []
    existing = None
    if prompt == "login" and ctx.headers.get("Sec-Fetch-Site") not in ("cross-site", "same-site"):
        # Forced re-authentication: the local session goes first (as wonderwall does). Not when
        # another site sent the browser here (a cross-site link would be a logout by GET); the
        # callback replaces the session anyway.
        s = await st.sessions.load(ctx.headers, touch=False)
        if s is not None:
            await st.sessions.end(s)
        cookies.append(st.sessions.set_cookie_header(None))
    else:
        s = await st.sessions.load(ctx.headers, touch=False)
        existing = s.acr if s is not None else None
    md = await st.provider.ensure_metadata()
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier, challenge = verifier_and_challenge()
    redirect_uri = _redirect_uri(st, ctx)
    attempt = {
        "v": verifier,
        "n": nonce,
        "t": target,
        "acr": acr,
        "p": prompt,
        "b": bh,
        "at": time.time(),
        "ru": redirect_uri,
        "prev_acr": existing,
    }
    await store.set(f"{pfx}a:{state_hash(state)}", json.dumps(attempt).encode(), cfg.login_attempt_seconds)
    params = {
        "response_type": "code",
        "client_id": cfg.provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(cfg.provider.scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "acr_values": acr,
    }
    if locale:
        params["ui_locales"] = locale
    if prompt:
        params["prompt"] = prompt
    authz = md["authorization_endpoint"]
    sep = "&" if "?" in authz else "?"
    if st.provider.par_endpoint:
        try:
            request_uri = await st.provider.push_authorization_request(params)
        except ProviderRefused as e:
            log.warning("persons: PAR refused: %s", e)
            st.audit_event(
                {"type": "login_failure", "reason": f"par_refused:{e.error}", "request_id": ctx.request_id}
            )
            return _done(
                ctx,
                pages.error_page(
                    502, "Innlogging kunne ikke startes / Login could not start", ctx.request_id
                ),
                "error",
                "par_refused",
            )
        location = (
            f"{authz}{sep}{urlencode({'client_id': cfg.provider.client_id, 'request_uri': request_uri})}"
        )
    elif cfg.provider.par == "required":
        raise ProviderUnavailable("PAR required but the OP offers no pushed_authorization_request_endpoint")
    else:
        location = f"{authz}{sep}{urlencode(params, quote_via=quote)}"
    if new_binding:
        cookies.append(
            f"__Host-portvakt-login={binding}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={cfg.login_attempt_seconds}"
        )
    return _done(ctx, _redirect(location, cookies), "allow", "login_started")


# ------------------------------------------------------------------------------------ callback


def _fail(
    st: PersonsStage,
    ctx: RequestContext,
    reason: str,
    status: int = 400,
    retry: str | None = None,
    extra: dict[str, Any] | None = None,
) -> web.StreamResponse:
    rec = {"type": "login_failure", "reason": reason, "request_id": ctx.request_id}
    if extra:
        rec.update(extra)
    st.audit_event(rec)
    msg = "Innloggingen mislyktes / Login failed"
    return _done(ctx, pages.error_page(status, msg, ctx.request_id, retry), "deny", reason)


async def callback(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    cfg = st.cfg
    q = ctx.request.query
    pfx = cfg.store.key_prefix
    state = q.get("state")
    if len(q.getall("state", ())) > 1 or len(q.getall("code", ())) > 1 or len(q.getall("iss", ())) > 1:
        return _fail(st, ctx, "callback_duplicate_parameters")
    if not state or len(state) > 512:
        return _fail(st, ctx, "callback_state_missing")
    raw = await st.store.take(f"{pfx}a:{state_hash(state)}")  # one use: a replayed callback finds nothing
    if raw is None:
        # Another tab finished first, or a stale/forged state: a live session goes on to the app.
        s = await st.sessions.load(ctx.headers, touch=False)
        if s is not None:
            st.audit_event(
                {
                    "type": "login_failure",
                    "reason": "callback_state_unknown",
                    "request_id": ctx.request_id,
                    "session_kept": True,
                }
            )
            return _done(ctx, _redirect("/"), "deny", "callback_state_unknown")
        return _fail(st, ctx, "callback_state_unknown", retry=f"{st.prefix}/login")
    attempt = json.loads(raw)
    try:
        await st.store.decr(f"{pfx}c:open:{attempt['b']}")
    except StoreUnavailable:
        pass
    retry = f"{st.prefix}/login?{urlencode({'redirect': attempt['t']}, quote_via=quote)}"
    binding_vals = cookie_values(ctx.headers.getall("Cookie", ()), "__Host-portvakt-login")
    if not any(
        secrets.compare_digest(_bhash(b), attempt["b"]) for b in binding_vals if len(b) == _BINDING_LEN
    ):
        # The callback arrived in a browser that did not start this login (login CSRF, a
        # forwarded callback URL): never bind someone else's login to this browser.
        return _fail(st, ctx, "callback_browser_mismatch", retry=retry)
    await st.provider.ensure_metadata()
    iss = q.get("iss")
    if iss is not None and iss != cfg.provider.issuer:
        return _fail(st, ctx, "callback_wrong_iss")
    if iss is None and st.provider.iss_parameter_supported:
        return _fail(st, ctx, "callback_iss_missing")
    err = q.get("error")
    if err is not None:
        safe = err if err.isascii() and err.replace("_", "").isalnum() and len(err) < 64 else "invalid"
        return _fail(
            st, ctx, f"provider_error:{safe}", status=400 if safe != "server_error" else 502, retry=retry
        )
    code = q.get("code")
    if not code or len(code) > 2048:
        return _fail(st, ctx, "callback_code_missing", retry=retry)
    try:
        tokens = await st.provider.exchange_code(code, attempt["v"], attempt["ru"])
    except ProviderRefused as e:
        return _fail(st, ctx, f"token_refused:{e.error}", retry=retry)
    id_token = tokens.get("id_token")
    if not isinstance(id_token, str) or not isinstance(tokens.get("access_token"), str):
        return _fail(st, ctx, "token_response_incomplete", retry=retry)
    try:
        claims = await st.provider.validate_id_token(
            id_token,
            nonce=attempt["n"],
            min_acr=attempt["acr"],
            auth_after=attempt["at"] if attempt.get("p") == "login" else None,
        )
    except IdTokenInvalid as e:
        return _fail(st, ctx, e.reason, retry=retry if e.reason == "acr_too_low" else None)
    # A fresh session id on every login (no fixation); the session the browser had goes.
    old = await st.sessions.load(ctx.headers, touch=False)
    if old is not None:
        await st.sessions.end(old)
    s = await st.sessions.create(claims, tokens)
    sh = session_hash(s.id)
    rec = {
        "type": "login_success",
        "request_id": ctx.request_id,
        "session": sh,
        "acr": claims.get("acr"),
        "amr": s.data["amr"],
        "auth_time": claims.get("auth_time"),
        "prompt": attempt.get("p"),
    }
    if claims.get("sid"):
        rec["op_session"] = sid_index_key(claims["iss"], claims["sid"])[:32]
    st.audit_event(rec, claims.get("pid"))
    prev = attempt.get("prev_acr")
    if old is not None and prev is not None and acr_rank(claims.get("acr")) > acr_rank(prev):
        st.audit_event(
            {
                "type": "step_up",
                "request_id": ctx.request_id,
                "session": sh,
                "from_acr": prev,
                "to_acr": claims.get("acr"),
            },
            claims.get("pid"),
        )
    ctx.audit["persons"] = {"session": sh, "acr": claims.get("acr") or ""}
    return _done(
        ctx,
        _redirect(attempt["t"], [st.sessions.set_cookie_header(st.sessions.cookie_for(s))]),
        "allow",
        "login_success",
    )


# -------------------------------------------------------------------------------------- logout


async def session_info(st: PersonsStage, ctx: RequestContext, refresh: bool = False) -> web.StreamResponse:
    s = await st.sessions.load(ctx.headers, touch=refresh)
    if s is None:
        return _problem(
            ctx, Problem("login_required", headers={"WWW-Authenticate": 'Bearer realm="portvakt"'})
        )
    if refresh:
        try:
            s = await st.sessions.ensure_fresh(s, force=True)
        except RefreshFailed:
            return _problem(
                ctx,
                Problem(
                    "login_required",
                    internal_reason="session_refresh_refused",
                    headers={"WWW-Authenticate": 'Bearer realm="portvakt"'},
                ),
            )
    d = s.data
    now = time.time()
    timeout_at = d["last_seen"] + st.cfg.idle_timeout_seconds
    doc = {
        "session": {
            "created_at": _iso(d["created"]),
            "ends_at": _iso(d["ends_at"]),
            "timeout_at": _iso(timeout_at),
            "ends_in_seconds": max(0, int(d["ends_at"] - now)),
            "timeout_in_seconds": max(0, int(min(timeout_at, d["ends_at"]) - now)),
            "active": True,
        },
        "tokens": {
            "expire_at": _iso(d["at_exp"]),
            "expire_in_seconds": max(0, int(d["at_exp"] - now)),
            "refreshed_at": _iso(d["refreshed_at"]) if d.get("refreshed_at") else None,
        },
        "acr": d.get("acr"),
        "amr": d.get("amr"),
        "auth_time": d.get("auth_time"),
        "locale": d.get("locale"),
    }
    resp = web.json_response(doc, headers={"Cache-Control": "no-store"})
    return _done(ctx, resp, "allow", None)


async def forward_auth(st: PersonsStage, ctx: RequestContext) -> web.StreamResponse:
    """For a proxy in front of another app (nginx ``auth_request``, Traefik forwardAuth): 204 with
    the person's level, amr and hashed session (never the pid, never a token); 401 without a live
    session; 403 when ``level`` is above the session's (step-up needed)."""
    from filters.persons import canonical_acr

    s = await st.sessions.load(ctx.headers)
    if s is None:
        return _problem(
            ctx, Problem("login_required", headers={"WWW-Authenticate": 'Bearer realm="portvakt"'})
        )
    level = ctx.request.query.get("level")
    if level is not None:
        level = canonical_acr(level) if level in ACR_RANKS else None
        if level is None:
            return _problem(ctx, Problem(problems.BAD_REQUEST, detail="unknown level"))
        if acr_rank(s.acr, st.cfg.provider.eidas_high_as_high) < acr_rank(level):
            www = f'Bearer error="insufficient_user_authentication", acr_values="{level}"'
            return _problem(ctx, Problem("step_up_required", status=403, headers={"WWW-Authenticate": www}))
    try:
        s = await st.sessions.ensure_fresh(s)
    except RefreshFailed:
        return _problem(
            ctx,
            Problem(
                "login_required",
                internal_reason="session_refresh_refused",
                headers={"WWW-Authenticate": 'Bearer realm="portvakt"'},
            ),
        )
    d = s.data
    h = {
        "Cache-Control": "no-store",
        "X-Portvakt-Acr": d.get("acr") or "",
        "X-Portvakt-Session": session_hash(s.id),
    }
    if d.get("amr"):
        h["X-Portvakt-Amr"] = " ".join(d["amr"])
    if d.get("auth_time") is not None:
        h["X-Portvakt-Auth-Time"] = str(int(d["auth_time"]))
    return _done(ctx, web.Response(status=204, headers=h), "allow", None)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
