"""The admin listener (never the public port): metrics, health, readiness, reload, JWKS.

- ``GET /metrics``: Prometheus exposition of ``gateway.metrics.REGISTRY`` (with ``--workers N``
  the supervisor serves the merge of its workers' registries; see gateway/workermetrics.py).
- ``GET /healthz``: 200 while the process runs.
- ``GET /readyz``: 200 when a config is loaded and no dependency reports ``down: ...``; the body
  lists each dependency's state. 503 otherwise (also while shutting down).
- ``POST /-/reload``: reload the config now; 200 ``{"result": "success"}`` or 500 with the list
  of problems (the old config stays in force).
- ``GET /.well-known/jwks.json``: the identity assertion keys (404 when identity forwarding is
  not configured).

A target object provides ``ready() -> (bool, dict)``, ``async reload() -> (bool, [problems])``,
``async jwks() -> dict | None`` and optionally ``metrics() -> (bytes, content_type)``.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import metrics
from gateway.server import split_listen


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json", headers={"Cache-Control": "no-store"},
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
        return _json({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = target.ready()
        return _json({"status": "ready" if ok else "not ready", **detail}, 200 if ok else 503)

    async def reload(_: web.Request) -> web.Response:
        ok, problems = await target.reload()
        if ok:
            return _json({"result": "success"})
        return _json({"result": "failure", "problems": problems}, 500)

    async def jwks(_: web.Request) -> web.Response:
        doc = await target.jwks()
        if doc is None:
            return _json({"error": "identity assertions are not configured"}, 404)
        return _json(doc)

    app = web.Application()
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
