"""The persons' endpoints' answers: no-store pages, redirects with cookies, problems."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway import problems
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import RequestContext


def _no_store(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _redirect(location: str, cookies: list[str] = ()) -> web.Response:  # type: ignore[assignment]
    resp = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    for c in cookies:
        resp.headers.add("Set-Cookie", c)
    return resp


def _done(
    ctx: RequestContext, resp: web.StreamResponse, decision: str = "allow", reason: str | None = None
) -> web.StreamResponse:
    ctx.status = resp.status
    ctx.decision = decision
    ctx.reason = reason
    resp.headers["X-Request-Id"] = ctx.request_id
    resp.headers["Server"] = "portvakt"
    return resp


def _problem(ctx: RequestContext, p: Problem) -> web.StreamResponse:
    ctx.status = p.status or 500
    ctx.decision = "deny" if (p.status or 500) < 500 else "error"
    ctx.reason = p.log_reason
    resp = problems.render(p, ctx.request_id)
    resp.headers["Server"] = "portvakt"
    return resp
