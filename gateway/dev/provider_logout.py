"""The dev ID-porten's logout (RP-initiated, with front-channel calls to every RP of the SSO
session) and "client B", a second relying party on the provider's own host that the single
sign-on and front-channel tests log in and out with. Mixed into ``DevProvider``."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jwt
from aiohttp import web

if TYPE_CHECKING:  # pragma: no cover
    from gateway.dev.provider import DevClient, SsoSession


class LogoutAndClientB:
    """Handlers that need the provider's clients, SSO sessions and signing key."""

    clients: dict[str, DevClient]
    sessions: dict[str, SsoSession]
    _codes: dict[str, dict[str, Any]]
    _clientb_state: dict[str, dict[str, Any]]
    frontchannel_calls: list[dict[str, str]]
    key: Any

    if TYPE_CHECKING:  # DevProvider's own properties and methods

        @property
        def issuer(self) -> str: ...

        @property
        def login_base(self) -> str: ...

        def _sso(self, request: web.Request) -> SsoSession | None: ...

        def _tokens(self, c: DevClient, sso: SsoSession, scope: str, nonce: str | None) -> dict[str, Any]: ...

    async def h_logout(self, request: web.Request) -> web.Response:
        p = dict(request.query)
        if request.method == "POST":
            p.update({k: str(v) for k, v in (await request.post()).items()})
        client = self.clients.get(p.get("client_id", ""))
        hint = p.get("id_token_hint")
        hint_sid = None
        if hint:
            try:
                claims = jwt.decode(
                    hint,
                    self.key.public_key(),
                    algorithms=["RS256"],
                    options={"verify_aud": False, "verify_exp": False},
                )
            except jwt.PyJWTError:
                return web.Response(status=400, text="bad id_token_hint")
            client = client or self.clients.get(claims.get("aud", ""))
            hint_sid = claims.get("sid")
        sso = self._sso(request)
        if sso is None and hint_sid:
            # A cross-site POST carries no SameSite=Lax cookie over plain http in this dev setup
            # (ID-porten's own cookie is SameSite=None; Secure): find the session by the hint's sid.
            sso = next((x for x in self.sessions.values() if x.sid == hint_sid), None)
        if sso is None and hint is None:
            return web.Response(status=400, text="no session to log out", content_type="text/plain")
        frames = []
        if sso is not None:
            self.sessions.pop(sso.id, None)
            for cid in sorted(sso.clients):
                c = self.clients.get(cid)
                if c is not None and c.frontchannel_logout_uri:
                    sep = "&" if "?" in c.frontchannel_logout_uri else "?"
                    frames.append(
                        c.frontchannel_logout_uri + sep + urlencode({"iss": self.issuer, "sid": sso.sid})
                    )
        back = p.get("post_logout_redirect_uri")
        target = None
        if client is not None and back in client.post_logout_redirect_uris:
            target = (
                back + ("&" if "?" in back else "?") + urlencode({"state": p["state"]})
                if p.get("state")
                else back
            )
        iframes = "".join(
            f'<iframe class="fc" src="{html.escape(f)}" style="width:1px;height:1px;border:0"></iframe>'
            for f in frames
        )
        go = json.dumps(target or "/logout/done")
        doc = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Dev ID-porten: logget ut</title></head><body>"
            f"<p id='out'>Du er logget ut.</p>{iframes}<script>"
            f"var n={len(frames)},done=0;function go(){{location.replace({go})}}"
            "document.querySelectorAll('iframe.fc').forEach(function(f){f.addEventListener('load',function(){if(++done>=n)go()})});"
            "if(n===0)go();setTimeout(go,5000);</script></body></html>"
        )
        resp = web.Response(text=doc, content_type="text/html", headers={"Cache-Control": "no-store"})
        resp.headers.add("Set-Cookie", "devop_sso=; Path=/; Max-Age=0")
        return resp

    async def h_logout_done(self, request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><p id='done'>Logget ut.</p>", content_type="text/html")

    # -- client B: a second relying party for SSO and logout tests ---------------------------------
    def _clientb_session(self, request: web.Request) -> dict[str, Any] | None:
        return self._clientb_state.get(request.cookies.get("clientb", ""))

    async def h_clientb_home(self, request: web.Request) -> web.Response:
        s = self._clientb_session(request)
        who = f"logged in: {html.escape(s['pid'])} ({html.escape(s['acr'])})" if s else "not logged in"
        return web.Response(
            text=f"<!doctype html><p id='clientb'>Client B: {who}</p>", content_type="text/html"
        )

    async def h_clientb_login(self, request: web.Request) -> web.Response:
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(16)
        self._clientb_state["st:" + state] = {"v": verifier}
        q = {
            "response_type": "code",
            "client_id": "client-b",
            "redirect_uri": f"{self.login_base}/clientb/callback",
            "scope": "openid",
            "state": state,
            "nonce": secrets.token_urlsafe(16),
            "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode(),
            "code_challenge_method": "S256",
            "acr_values": request.query.get("acr", "idporten-loa-substantial"),
        }
        raise web.HTTPFound(f"{self.login_base}/authorize?{urlencode(q)}")

    async def h_clientb_callback(self, request: web.Request) -> web.Response:
        st = self._clientb_state.pop("st:" + request.query.get("state", ""), None)
        code = self._codes.get(request.query.get("code", ""))
        if st is None or code is None or code["used"]:
            return web.Response(status=400, text="client B: bad callback")
        code["used"] = True
        sso = self.sessions[code["sso"]]
        sid = secrets.token_urlsafe(16)
        self._clientb_state[sid] = {
            "pid": sso.pid,
            "acr": sso.acr,
            "sso_sid": sso.sid,
            "id_token": self._tokens(self.clients["client-b"], sso, "openid", None)["id_token"],
        }
        resp = web.HTTPFound(f"{self.login_base}/clientb/")
        resp.headers.add("Set-Cookie", f"clientb={sid}; Path=/clientb/; HttpOnly; SameSite=Lax")
        raise resp

    async def h_clientb_logout(self, request: web.Request) -> web.Response:
        s = self._clientb_session(request)
        q = {
            "client_id": "client-b",
            "post_logout_redirect_uri": f"{self.login_base}/clientb/",
            "state": "b-state",
        }
        if s:
            q["id_token_hint"] = s["id_token"]
        raise web.HTTPFound(f"{self.login_base}/logout?{urlencode(q)}")

    async def h_clientb_frontchannel(self, request: web.Request) -> web.Response:
        self.frontchannel_calls.append(dict(request.query))
        for k in [
            k
            for k, v in self._clientb_state.items()
            if isinstance(v, dict) and v.get("sso_sid") == request.query.get("sid")
        ]:
            self._clientb_state.pop(k, None)
        return web.Response(text="", headers={"Cache-Control": "no-store"})
