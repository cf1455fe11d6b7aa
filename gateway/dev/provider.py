"""A development OpenID Provider that behaves like ID-porten, for ``make run`` and the tests.

Not for production. What it copies from ID-porten (``research/persons-login.md`` §a):

- two hosts: the browser meets ``login_host`` (authorize, login page, logout); the relying party
  calls the issuer host (discovery, PAR, token, JWKS, revoke). ``iss`` has no trailing slash;
- ``response_type=code`` only, PKCE S256 required, PAR (``urn:idporten:...`` request_uri, 120 s;
  ``client_id`` + ``request_uri`` only on /authorize), ``iss`` in the authorization response
  (RFC 9207), errors redirected back (``error=access_denied``), ``state`` URL-encoded;
- a login page where the tester types a (synthetic) pid and picks the level of assurance, like
  TestID; SSO across clients (30 min idle / 120 min max), ``prompt=login`` forces the page again;
- client authentication ``private_key_jwt`` (RS256, ``aud`` = issuer or token endpoint, unique
  ``jti``) or a client secret; refresh tokens rotated on every use, a reused one refused;
- id_token RS256 with ``pid``, ``acr``, ``amr`` (array), ``locale``, ``auth_time``, ``nonce`` and
  ``sid`` only for clients registered with ``frontchannel_logout_session_required``;
- end session by GET or POST: one iframe per logged-in client to its ``frontchannel_logout_uri``
  with ``iss`` and ``sid``, then back to ``post_logout_redirect_uri`` with ``state``;
- a second client ("client B", pages under ``/clientb/``) for SSO and logout tests.

Tests drive it in-process: counters (``grants``, ``par_requests``, ``authorize_requests``,
``revocations``, ``frontchannel_calls``) and switches (``token_failure``, ``refresh_failure``,
``force_acr``, ``id_token_hook``) are plain attributes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.dev.provider_logout import LogoutAndClientB
from gateway.dev.server import LocalAppServer

ACR_LEVELS = ("idporten-loa-substantial", "idporten-loa-high")
DEFAULT_PID = "24917397852"  # synthetic test number (the demo's person)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _rsa_jwk(pub: Any, kid: str) -> dict[str, str]:
    n = pub.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": _b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
        "e": _b64(n.e.to_bytes(3, "big")),
    }


@dataclass
class DevClient:
    client_id: str
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str] = field(default_factory=list)
    frontchannel_logout_uri: str | None = None
    frontchannel_logout_session_required: bool = True
    public_key: Any = None  # private_key_jwt
    secret: str | None = None  # client_secret_basic / client_secret_post
    scopes: tuple[str, ...] = ("openid", "profile")


@dataclass
class SsoSession:
    id: str
    pid: str
    acr: str
    auth_time: int
    sid: str
    created: float
    last: float
    locale: str = "nb"
    clients: set[str] = field(default_factory=set)


class DevProvider(LogoutAndClientB, LocalAppServer):
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        login_host: str = "localhost",
        access_ttl: int = 120,
        refresh_ttl: int = 600,
        grant_ttl: int = 7200,
        trailing_slash: bool = False,
        key: rsa.RSAPrivateKey | None = None,
    ):
        self.host, self.port, self.login_host = host, port, login_host
        self.access_ttl, self.refresh_ttl, self.grant_ttl = access_ttl, refresh_ttl, grant_ttl
        self.trailing_slash = trailing_slash
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "dev-" + secrets.token_hex(4)
        self.clients: dict[str, DevClient] = {}
        self.sessions: dict[str, SsoSession] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._par: dict[str, tuple[dict[str, str], float]] = {}
        self._codes: dict[str, dict[str, Any]] = {}
        self._refresh: dict[str, dict[str, Any]] = {}
        self._jtis: set[str] = set()
        self._clientb_state: dict[str, dict[str, Any]] = {}
        # Counters and switches for tests.
        self.grants: Counter[str] = Counter()
        self.par_requests: list[dict[str, str]] = []
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, Any]] = []
        self.revocations: list[str] = []
        self.frontchannel_calls: list[dict[str, str]] = []
        self.logins = 0
        self.token_failure: int | None = None  # status for every token request (e.g. 500, 503)
        self.refresh_failure: int | None = None  # status for refresh grants only (400 -> invalid_grant)
        self.token_delay = 0.0
        self.force_acr: str | None = None  # every id_token says this acr (login-loop tests)
        self.id_token_hook: (
            Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any], Any, str]] | None
        ) = None
        self.omit_iss = False
        self.wrong_iss: str | None = None
        self._runner: web.AppRunner | None = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}" + ("/" if self.trailing_slash else "")

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def login_base(self) -> str:
        return f"http://{self.login_host}:{self.port}"

    def metadata(self) -> dict[str, Any]:
        b, lb = self.base, self.login_base
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{lb}/authorize",
            "pushed_authorization_request_endpoint": f"{b}/par",
            "token_endpoint": f"{b}/token",
            "end_session_endpoint": f"{lb}/logout",
            "revocation_endpoint": f"{b}/revoke",
            "jwks_uri": f"{b}/jwks.json",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "form_post", "fragment"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "acr_values_supported": list(ACR_LEVELS),
            "ui_locales_supported": ["nb", "nn", "en", "se"],
            "token_endpoint_auth_methods_supported": [
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
            ],
            "authorization_response_iss_parameter_supported": True,
            "frontchannel_logout_supported": True,
            "frontchannel_logout_session_supported": True,
            "request_uri_parameter_supported": False,
        }

    def register(self, client: DevClient) -> DevClient:
        self.clients[client.client_id] = client
        return client

    def add_client_b(self) -> DevClient:
        lb = self.login_base
        return self.register(
            DevClient(
                "client-b",
                [f"{lb}/clientb/callback"],
                [f"{lb}/clientb/"],
                f"{lb}/clientb/frontchannel",
                True,
                secret="client-b-secret-not-secret",
            )
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/.well-known/openid-configuration", self.h_metadata)
        r.add_get("/jwks.json", self.h_jwks)
        r.add_post("/par", self.h_par)
        r.add_get("/authorize", self.h_authorize)
        r.add_post("/authorize/login", self.h_login)
        r.add_post("/token", self.h_token)
        r.add_post("/revoke", self.h_revoke)
        r.add_route("*", "/logout", self.h_logout)
        r.add_get("/logout/done", self.h_logout_done)
        r.add_get("/clientb/", self.h_clientb_home)
        r.add_get("/clientb/login", self.h_clientb_login)
        r.add_get("/clientb/callback", self.h_clientb_callback)
        r.add_get("/clientb/logout", self.h_clientb_logout)
        r.add_get("/clientb/frontchannel", self.h_clientb_frontchannel)
        return app

    # -- helpers -------------------------------------------------------------------------------
    def _authenticate(self, request: web.Request, form: Any, audiences: list[str]) -> DevClient | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            from urllib.parse import unquote

            c = self.clients.get(unquote(cid))
            return (
                c
                if c is not None and c.secret and secrets.compare_digest(c.secret, unquote(secret))
                else None
            )
        cid = form.get("client_id")
        c = self.clients.get(cid or "")
        if c is None:
            return None
        if form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            if c.public_key is None:
                return None
            try:
                claims = jwt.decode(
                    form.get("client_assertion", ""),
                    c.public_key,
                    algorithms=["RS256"],
                    audience=audiences,
                    issuer=c.client_id,
                    options={"require": ["exp", "iat", "jti"]},
                )
            except jwt.PyJWTError:
                return None
            if (
                claims.get("sub") != c.client_id
                or claims["jti"] in self._jtis
                or claims["exp"] - claims["iat"] > 120
            ):
                return None
            self._jtis.add(claims["jti"])
            return c
        if c.secret and form.get("client_secret") and secrets.compare_digest(c.secret, form["client_secret"]):
            return c
        return None

    @staticmethod
    def _oauth_error(status: int, error: str, desc: str = "") -> web.Response:
        return web.json_response(
            {"error": error, "error_description": desc}, status=status, headers={"Cache-Control": "no-store"}
        )

    def _redirect_back(self, redirect_uri: str, params: dict[str, str]) -> web.Response:
        q = dict(params)
        if not self.omit_iss:
            q["iss"] = self.wrong_iss or self.issuer
        sep = "&" if "?" in redirect_uri else "?"
        # ID-porten URL-encodes state before returning it (urlencode does exactly that).
        raise web.HTTPFound(redirect_uri + sep + urlencode(q))

    def _sso(self, request: web.Request) -> SsoSession | None:
        s = self.sessions.get(request.cookies.get("devop_sso", ""))
        now = time.time()
        if s is None or now - s.last > 1800 or now - s.created > 7200:
            return None
        return s

    # -- PAR + authorize -------------------------------------------------------------------------
    async def h_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata())

    async def h_jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [_rsa_jwk(self.key.public_key(), self.kid)]})

    async def h_par(self, request: web.Request) -> web.Response:
        form = await request.post()
        c = self._authenticate(request, form, [self.issuer, f"{self.base}/par", self.issuer.rstrip("/")])
        if c is None:
            return self._oauth_error(401, "invalid_client")
        params = {
            k: str(v)
            for k, v in form.items()
            if not k.startswith("client_assertion") and k != "client_secret"
        }
        if "request_uri" in params:
            return self._oauth_error(400, "invalid_request", "request_uri not allowed in PAR")
        self.par_requests.append(dict(params))
        uri = "urn:idporten:" + secrets.token_urlsafe(24)
        self._par[uri] = (params, time.time() + 120)
        return web.json_response({"request_uri": uri, "expires_in": 120}, status=201)

    async def h_authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if "request_uri" in q:
            hit = self._par.pop(q["request_uri"], None)
            extra = set(q) - {"client_id", "request_uri"}
            if hit is None or hit[1] < time.time() or extra or hit[0].get("client_id") != q.get("client_id"):
                return web.Response(status=400, text="invalid request_uri")
            q = dict(hit[0])
        self.authorize_requests.append(dict(q))
        c = self.clients.get(q.get("client_id", ""))
        if c is None or q.get("redirect_uri") not in c.redirect_uris:
            return web.Response(status=400, text="unknown client or redirect_uri")  # never redirect then
        back = q["redirect_uri"]
        st = {"state": q["state"]} if "state" in q else {}
        if q.get("response_type") != "code":
            self._redirect_back(back, {"error": "unsupported_response_type", **st})
        if q.get("code_challenge_method") != "S256" or len(q.get("code_challenge", "")) != 43:
            self._redirect_back(
                back, {"error": "invalid_request", "error_description": "PKCE S256 required", **st}
            )
        acr = q.get("acr_values", "idporten-loa-substantial").split()[0]
        if acr not in ACR_LEVELS:
            acr = "idporten-loa-substantial"
        q["acr"] = acr
        sso = self._sso(request)
        rank = ACR_LEVELS.index
        if sso is not None and q.get("prompt") != "login" and rank(sso.acr) >= rank(acr):
            sso.last = time.time()
            return self._issue_code(c, q, sso)
        tx = secrets.token_urlsafe(16)
        self._pending[tx] = q
        return self._login_page(tx, acr, q.get("ui_locales", "nb"))

    def _login_page(self, tx: str, acr: str, locale: str) -> web.Response:
        radios = "".join(
            f'<label><input type="radio" name="acr" value="{a}" id="acr-{a.rsplit("-", 1)[1]}"'
            f"{' checked' if a == acr else ''}> {a}</label><br>"
            for a in ACR_LEVELS
        )
        doc = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Dev ID-porten: logg inn</title></head>"
            "<body style='font-family:sans-serif;max-width:30em;margin:3em auto'>"
            f"<h1>Dev ID-porten</h1><p>TestID-style login (development only). Language: {html.escape(locale)}</p>"
            f"<form method='post' action='/authorize/login'><input type='hidden' name='tx' value='{tx}'>"
            f"<label>Fødselsnummer (synthetic): <input name='pid' id='pid' value='{DEFAULT_PID}'></label><br><br>"
            f"{radios}<br><button name='action' value='login' id='login'>Logg inn</button> "
            "<button name='action' value='cancel' id='cancel'>Avbryt</button></form></body></html>"
        )
        return web.Response(text=doc, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def h_login(self, request: web.Request) -> web.Response:
        form = await request.post()
        q = self._pending.pop(str(form.get("tx", "")), None)
        if q is None:
            return web.Response(status=400, text="login expired")
        st = {"state": q["state"]} if "state" in q else {}
        if form.get("action") == "cancel":
            self._redirect_back(
                q["redirect_uri"], {"error": "access_denied", "error_description": "User cancelled", **st}
            )
        pid = str(form.get("pid", DEFAULT_PID))
        acr = str(form.get("acr", q["acr"]))
        if acr not in ACR_LEVELS:
            acr = q["acr"]
        now = time.time()
        sso = SsoSession(
            secrets.token_urlsafe(16),
            pid,
            acr,
            int(now),
            str(uuid.uuid4()),
            now,
            now,
            q.get("ui_locales", "nb").split()[0],
        )
        old = self._sso(request)
        if old is not None:  # re-authentication keeps the OP session (and its sid) going
            sso.sid, sso.clients, sso.created = old.sid, old.clients, old.created
            self.sessions.pop(old.id, None)
        self.sessions[sso.id] = sso
        self.logins += 1
        c = self.clients[q["client_id"]]
        resp = self._issue_code(c, q, sso)
        return resp

    def _issue_code(self, c: DevClient, q: dict[str, str], sso: SsoSession) -> web.Response:
        code = secrets.token_urlsafe(32)
        self._codes[code] = {
            "client_id": c.client_id,
            "redirect_uri": q["redirect_uri"],
            "challenge": q["code_challenge"],
            "nonce": q.get("nonce"),
            "sso": sso.id,
            "scope": q.get("scope", "openid"),
            "exp": time.time() + 60,
            "used": False,
        }
        sso.clients.add(c.client_id)
        try:
            self._redirect_back(
                q["redirect_uri"], {"code": code, **({"state": q["state"]} if "state" in q else {})}
            )
        except web.HTTPFound as found:
            found.headers.add("Set-Cookie", f"devop_sso={sso.id}; Path=/; HttpOnly; SameSite=Lax")
            raise found
        raise AssertionError("unreachable")

    # -- token ---------------------------------------------------------------------------------
    def _tokens(self, c: DevClient, sso: SsoSession, scope: str, nonce: str | None) -> dict[str, Any]:
        now = int(time.time())
        sub = _b64(hashlib.sha256(f"{sso.pid}|{c.client_id}".encode()).digest())[:32]
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": c.client_id,
            "sub": sub,
            "iat": now,
            "exp": now + self.access_ttl,
            "jti": str(uuid.uuid4()),
            "auth_time": sso.auth_time,
            "acr": self.force_acr or sso.acr,
            "amr": ["TestID"],
            "pid": sso.pid,
            "locale": sso.locale,
        }
        if nonce:
            claims["nonce"] = nonce
        if c.frontchannel_logout_session_required:
            claims["sid"] = sso.sid
        header = {"kid": self.kid, "typ": "JWT"}
        key, alg = self.key, "RS256"
        if self.id_token_hook is not None:
            claims, header, key, alg = self.id_token_hook(claims, header)
        id_token = (
            jwt.encode(claims, key, algorithm=alg, headers=header)
            if alg != "none"
            else _unsigned(claims, header)
        )
        at = jwt.encode(
            {
                "iss": self.issuer,
                "client_id": c.client_id,
                "scope": scope,
                "pid": sso.pid,
                "acr": sso.acr,
                "iat": now,
                "exp": now + self.access_ttl,
                "jti": str(uuid.uuid4()),
                "token_type": "Bearer",
            },
            self.key,
            algorithm="RS256",
            headers={"kid": self.kid},
        )
        rt = secrets.token_urlsafe(32)
        self._refresh[rt] = {
            "client_id": c.client_id,
            "sso": sso.id,
            "scope": scope,
            "exp": now + self.refresh_ttl,
            "grant_exp": now + self.grant_ttl,
        }
        return {
            "access_token": at,
            "id_token": id_token,
            "refresh_token": rt,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "scope": scope,
        }

    async def h_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        c = self._authenticate(request, form, [self.issuer, f"{self.base}/token", self.issuer.rstrip("/")])
        gt = form.get("grant_type")
        self.token_requests.append(
            {
                "grant_type": gt,
                "client": c.client_id if c else None,
                "auth": "basic"
                if request.headers.get("Authorization")
                else ("private_key_jwt" if "client_assertion" in form else "post"),
            }
        )
        if self.token_failure:
            return self._oauth_error(
                self.token_failure, "server_error" if self.token_failure >= 500 else "invalid_grant"
            )
        if c is None:
            return self._oauth_error(401, "invalid_client")
        self.grants[str(gt)] += 1
        if gt == "authorization_code":
            code = self._codes.get(str(form.get("code", "")))
            if code is None or code["client_id"] != c.client_id or code["exp"] < time.time():
                return self._oauth_error(400, "invalid_grant")
            if code["used"]:
                return self._oauth_error(400, "invalid_grant", "code already used")
            code["used"] = True
            if form.get("redirect_uri") != code["redirect_uri"]:
                return self._oauth_error(400, "invalid_grant", "redirect_uri")
            verifier = str(form.get("code_verifier", ""))
            if (
                not 43 <= len(verifier) <= 128
                or _b64(hashlib.sha256(verifier.encode()).digest()) != code["challenge"]
            ):
                return self._oauth_error(400, "invalid_grant", "PKCE")
            sso = self.sessions.get(code["sso"])
            if sso is None:
                return self._oauth_error(400, "invalid_grant")
            return web.json_response(
                self._tokens(c, sso, code["scope"], code["nonce"]), headers={"Cache-Control": "no-store"}
            )
        if gt == "refresh_token":
            if self.refresh_failure:
                return self._oauth_error(
                    self.refresh_failure, "invalid_grant" if self.refresh_failure < 500 else "server_error"
                )
            rt = self._refresh.pop(str(form.get("refresh_token", "")), None)  # rotation: one use each
            now = time.time()
            if rt is None or rt["client_id"] != c.client_id or rt["exp"] < now or rt["grant_exp"] < now:
                return self._oauth_error(400, "invalid_grant")
            sso = self.sessions.get(rt["sso"])
            if sso is None:
                return self._oauth_error(400, "invalid_grant", "session ended")
            out = self._tokens(c, sso, rt["scope"], None)
            self._refresh[out["refresh_token"]]["grant_exp"] = rt["grant_exp"]
            return web.json_response(out, headers={"Cache-Control": "no-store"})
        return self._oauth_error(400, "unsupported_grant_type")

    async def h_revoke(self, request: web.Request) -> web.Response:
        form = await request.post()
        c = self._authenticate(request, form, [self.issuer, f"{self.base}/revoke", self.issuer.rstrip("/")])
        if c is None:
            return self._oauth_error(401, "invalid_client")
        tok = str(form.get("token", ""))
        self.revocations.append(str(form.get("token_type_hint", "")))
        self._refresh.pop(tok, None)
        return web.Response(status=200)

    # -- logout ----------------------------------------------------------------------------------


def _unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    h = {**header, "alg": "none"}
    return f"{_b64(json.dumps(h).encode())}.{_b64(json.dumps(claims).encode())}."
