"""The admin listener (never the public port): metrics, health, readiness, reload, JWKS.

- ``GET /metrics``: Prometheus exposition of ``gateway.metrics.REGISTRY`` (with ``--workers N``
  the supervisor serves the merge of its workers' registries; see gateway/workermetrics.py).
- ``GET /healthz``: 200 while the process runs; under the supervisor, 200 only while every
  configured worker is live (else 503 ``degraded`` with the counts).
- ``GET /readyz``: 200 when a config is loaded and no dependency reports ``down: ...``; the body
  lists each dependency's state. 503 otherwise (also while shutting down).
- ``POST /-/reload``: reload the config now; 200 ``{"result": "success"}``, or for a rejected
  config 422 ``application/problem+json`` (reason ``config_rejected``) whose ``problems`` lists
  every problem as ``file: yaml.path: reason`` (the old config stays in force). When
  ``admin.reload_token`` or ``admin.reload_token_file`` is set, the call needs
  ``Authorization: Bearer <token>`` (401 ``admin_token_required`` otherwise); the token is
  compared in constant time and never logged.
- ``GET /.well-known/jwks.json``: the identity assertion keys (404 when identity forwarding is
  not configured).

Every admin POST made by a web page is refused before anything else (403 ``admin_cross_origin``):
a foreign ``Origin`` (``null`` included), ``Sec-Fetch-Site: cross-site|same-site``, a form
content type (``application/x-www-form-urlencoded``, ``multipart/form-data``, ``text/plain``: what
a cross-origin "simple" request can send without a CORS preflight), and, when the request carries
browser headers (``Origin`` or ``Sec-Fetch-*``), a content type other than ``application/json`` or
a ``Host`` that is not an IP literal or ``localhost`` (DNS rebinding). ``curl -X POST`` (no Origin,
no content type) keeps working.

A target object provides ``ready() -> (bool, dict)``, ``async reload() -> (bool, [problems])``,
``async jwks() -> dict | None`` and optionally ``metrics() -> (bytes, content_type)`` and
``reload_token() -> str | None``. Every admin response says ``Server: portvakt`` (not aiohttp's
default, which names the Python and aiohttp versions).
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import metrics, problems
from gateway.listener import split_listen
from gateway.requestfacts import new_request_id

CONFIG_REJECTED = problems.CONFIG_REJECTED
ADMIN_TOKEN_REQUIRED = problems.ADMIN_TOKEN_REQUIRED
ADMIN_CROSS_ORIGIN = problems.ADMIN_CROSS_ORIGIN
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


def _loopback_or_literal(host: str) -> bool:
    """Whether a Host header value names this machine by IP literal or ``localhost`` (a DNS
    rebinding page's requests carry the attacker's name)."""
    h = host.strip().lower()
    if h.startswith("["):
        return "]" in h
    name = h.rpartition(":")[0] if h.count(":") == 1 else h
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def browser_post_refusal(request: web.BaseRequest) -> str | None:
    """Why an admin POST looks like a web page's request (internal reason), or None."""
    headers = request.headers
    origin = headers.get("Origin")
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    ctype = (headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    host = headers.get("Host") or ""
    if site in ("cross-site", "same-site"):
        return "sec_fetch_site"
    if origin is not None and origin.strip().lower() not in (
        f"http://{host}".lower(),
        f"https://{host}".lower(),
    ):
        return "foreign_origin"
    if ctype in _FORM_TYPES:
        return "form_content_type"
    browser = origin is not None or any(k.lower().startswith("sec-fetch-") for k in headers)
    if browser:
        if ctype != "application/json":
            return "browser_content_type"
        if not _loopback_or_literal(host):
            return "browser_host_name"
    return None


def resolve_reload_token(cfg: Any) -> str | None:
    """The token ``POST /-/reload`` requires under ``cfg`` (None: no token). Raises ValueError
    naming the yaml path when the token file cannot be read or holds too short a token."""
    admin = cfg.admin
    token = getattr(admin, "reload_token", None)
    path = getattr(admin, "reload_token_file", None)
    if path:
        full = cfg.resolve_path(path)
        try:
            with open(full, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(
                f"admin.reload_token_file: cannot read {full}: {getattr(e, 'strerror', None) or e}"
            ) from None
        if len(token) < 16:
            raise ValueError(f"admin.reload_token_file: {full} must hold a token of at least 16 characters")
    return token or None


def _problem(
    reason: str, request_id: str, extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    p = problems.Problem(reason, extra=extra or {}, headers=headers or {})
    return problems.render(p, request_id)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def build_admin_app(target: Any) -> web.Application:
    async def metrics_view(_: web.Request) -> web.Response:
        fn = getattr(target, "metrics", None)
        if fn is not None:
            res = fn()
            body, ctype = (await res) if inspect.isawaitable(res) else res
        else:
            body, ctype = generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    async def healthz(_: web.Request) -> web.Response:
        healthy = getattr(target, "healthy", None)  # the supervisor: are all its workers alive?
        if healthy is None:
            return _json({"status": "ok"})
        ok, detail = healthy()
        return _json({"status": "ok" if ok else "degraded", **detail}, 200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = target.ready()
        return _json({"status": "ready" if ok else "not ready", **detail}, 200 if ok else 503)

    async def reload(request: web.Request) -> web.Response:
        rid = new_request_id()
        get_token = getattr(target, "reload_token", None)
        token = get_token() if get_token is not None else None
        if token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _problem(
                    ADMIN_TOKEN_REQUIRED, rid, headers={"WWW-Authenticate": 'Bearer realm="portvakt-admin"'}
                )
        ok, found = await target.reload()
        if ok:
            return _json({"result": "success"})
        return _problem(CONFIG_REJECTED, rid, {"result": "failure", "problems": found})

    async def jwks(_: web.Request) -> web.Response:
        doc = await target.jwks()
        if doc is None:
            return _json({"error": "identity assertions are not configured"}, 404)
        return _json(doc)

    async def server_header(_: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = "portvakt"

    @web.middleware
    async def no_browser_posts(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "GET" and request.method != "HEAD":
            why = browser_post_refusal(request)
            if why is not None:
                logging.getLogger("portvakt.admin").warning(
                    "admin %s refused: looks like a web page's request (%s)", request.method, why
                )
                return _problem(ADMIN_CROSS_ORIGIN, new_request_id())
        return await handler(request)

    app = web.Application(middlewares=[no_browser_posts])
    app.on_response_prepare.append(server_header)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/-/reload", reload)
    app.router.add_get("/.well-known/jwks.json", jwks)
    return app


async def start_admin(target: Any, listen: str | None, *, unix_path: str | None = None) -> web.AppRunner:
    """Serve the admin app on ``listen`` (HOST:PORT) or a unix socket; returns the runner."""
    runner = web.AppRunner(build_admin_app(target), access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    if unix_path is not None:
        site: web.BaseSite = web.UnixSite(runner, unix_path)
    else:
        assert listen is not None
        host, port = split_listen(listen)
        site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
