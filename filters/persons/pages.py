"""The few HTML pages the login endpoints serve: an auto-submitted logout form and error pages.

Every page is ``no-store``, has a strict CSP (inline script only by nonce), and says nothing of
why a login failed beyond a generic sentence and the request id (the reason is in the audit)."""

from __future__ import annotations

import html
import secrets

from aiohttp import web


def _page(
    title: str, body: str, status: int, nonce: str | None = None, form_action: str | None = None
) -> web.Response:
    csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    csp += f"; script-src 'nonce-{nonce}'" if nonce else ""
    csp += f"; form-action {form_action}" if form_action else "; form-action 'none'"
    doc = (
        '<!doctype html><html lang="nb"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width"></head>'
        '<body style="font-family:sans-serif;max-width:40em;margin:3em auto">'
        f"{body}</body></html>"
    )
    return web.Response(
        status=status,
        text=doc,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


def error_page(status: int, message: str, request_id: str, retry_url: str | None = None) -> web.Response:
    body = f"<h1>{html.escape(message)}</h1><p>Referanse: <code>{html.escape(request_id)}</code></p>"
    if retry_url:
        body += f'<p><a id="retry" href="{html.escape(retry_url)}">Prøv igjen / Try again</a></p>'
    return _page(message, body, status)


def post_form_page(action: str, fields: dict[str, str], origin: str) -> web.Response:
    """A form POSTed to ``action`` as soon as the page loads (RP-initiated logout: the
    ``id_token_hint`` stays out of URLs, browser history and server logs)."""
    nonce = secrets.token_urlsafe(16)
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in fields.items()
    )
    body = (
        f'<form id="f" method="post" action="{html.escape(action)}">{inputs}'
        '<noscript><button type="submit">Logg ut / Log out</button></noscript></form>'
        f'<script nonce="{nonce}">document.getElementById("f").submit()</script>'
    )
    return _page("Logger ut", body, 200, nonce=nonce, form_action=origin)


def logout_confirm_page(
    action: str, csrf: str, status: int = 200, op_origin: str | None = None
) -> web.Response:
    """The answer to ``GET <prefix>/logout``: a button that POSTs the logout (with the session's
    CSRF token); a GET never ends anything (a cross-site ``<img src>`` cannot log a person out)."""
    body = (
        "<h1>Logg ut / Log out</h1>"
        f'<form id="logout" method="post" action="{html.escape(action)}">'
        f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
        '<button id="logout-confirm" type="submit">Logg ut / Log out</button></form>'
    )
    return _page("Logg ut", body, status, form_action="'self'" + (f" {op_origin}" if op_origin else ""))
