"""The admin page: server-rendered HTML with plain forms (no script), one single-use CSRF token
per form. Everything shown is escaped; the page is framed by no one (CSP frame-ancestors 'none')."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from aiohttp import web

from filters.delegation.config import ADMIN, ALL_SERVICES

if TYPE_CHECKING:  # pragma: no cover
    from filters.delegation import DelegationStage
    from filters.persons import PersonsStage
    from gateway.context import RequestContext

CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


def e(v: Any) -> str:
    return html.escape(str(v if v is not None else ""), quote=True)


async def render(
    st: DelegationStage, persons: PersonsStage, ctx: RequestContext, ref: str, sh: str
) -> web.StreamResponse:
    from filters.delegation import endpoints as ep
    from filters.delegation.admin import Authority, public

    a = st.admin_prefix
    mine = [g for g in await st.store.of_subject("person", ref) if g["role"] == ADMIN]
    orgs = sorted({g["organization"] for g in mine})
    chosen = ctx.request.query.get("org")
    if chosen not in orgs:
        chosen = orgs[0] if orgs else None
    out = [
        "<!doctype html><html lang='nb'><head><meta charset='utf-8'><title>Portvakt – administrasjon</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px}</style>",
        "</head><body><h1>Tilganger / Privileges</h1>",
    ]
    if not orgs:
        out.append("<p id='none'>Du administrerer ingen organisasjon. / You administer no organisation.</p>")
    else:
        out.append(
            "<p>Organisasjon: "
            + " ".join(f"<a class='org' href='{e(a)}/?org={e(o)}'>{e(o)}</a>" for o in orgs)
            + "</p>"
        )
    if chosen is not None:
        grants = await st.store.grants(chosen)
        auth = Authority(grants, ref)
        scope = "alle tjenester / all services" if auth.org_admin else ", ".join(sorted(auth.services))
        out.append(f"<h2 id='org'>{e(chosen)}</h2><p id='scope'>Du administrerer: {e(scope)}</p>")
        out.append(
            "<table id='grants'><tr><th>Hvem</th><th>Rolle</th><th>Tjeneste</th><th>Grunnlag</th><th></th></tr>"
        )
        for g in grants:
            if not auth.visible(g):
                continue
            p = public(g)
            who = p["subject"].get("person") or "integrasjon " + p["subject"].get("integration", "")
            out.append(
                f"<tr class='grant' data-id='{e(g['id'])}'><td>{e(who)}</td><td>{e(g['role'])}</td>"
                f"<td>{e(g['service'])}</td><td>{e(g.get('basis'))}</td><td>"
            )
            if not g.get("seeded"):
                tok = await ep.new_csrf(persons, sh)
                out.append(
                    f"<form method='post' action='{e(a)}/ui/withdraw'><input type='hidden' name='csrf' value='{e(tok)}'>"
                    f"<input type='hidden' name='organization' value='{e(chosen)}'>"
                    f"<input type='hidden' name='grant' value='{e(g['id'])}'>"
                    f"<button type='submit' class='withdraw'>Trekk tilbake / Withdraw</button></form>"
                )
            out.append("</td></tr>")
        out.append("</table>")
        roles = ([ADMIN] if auth.org_admin else []) + list(st.cfg.privileges)
        services = ([ALL_SERVICES] + st.services) if auth.org_admin else sorted(auth.services)
        tok = await ep.new_csrf(persons, sh)
        out.append(
            f"<h3>Gi tilgang / Grant</h3><form id='grant' method='post' action='{e(a)}/ui/grant'>"
            f"<input type='hidden' name='csrf' value='{e(tok)}'><input type='hidden' name='organization' value='{e(chosen)}'>"
            "<label>Fødselsnummer <input id='person' name='person' inputmode='numeric' maxlength='11' autocomplete='off'></label> "
            "<label>Rolle <select id='role' name='role'>"
            + "".join(f"<option>{e(r)}</option>" for r in roles)
            + "</select></label> "
            "<label>Tjeneste <select id='service' name='service'>"
            + "".join(f"<option>{e(s)}</option>" for s in services)
            + "</select></label> <label>Grunnlag <input id='basis' name='basis' maxlength='200'></label> "
            "<button id='grant-submit' type='submit'>Gi / Grant</button></form>"
        )
        out.append(
            f"<p><a id='audit' href='{e(a)}/orgs/{e(chosen)}/audit'>Revisjonslogg / Audit trail (JSON)</a></p>"
        )
    out.append("</body></html>")
    resp = web.Response(text="".join(out), content_type="text/html")
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make the form's Origin "null"
    return ep.done(ctx, resp, "allow", None)
