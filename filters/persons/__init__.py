"""Persons log in: an OpenID Connect relying party for ID-porten inside the gateway.

Config ``persons:`` (``filters.persons.config``) and a route's ``person:`` block. The stage owns
the OP client (``oidc``), the session store (``store``) and the sessions (``sessions``); it adds

- to every route a filter that removes Portvakt's own cookies from the upstream request, and
- to routes with ``person:`` the filter that requires a live session at the route's ``min_acr``:
  a navigation without one is sent to login (step-up: with ``acr_values``), any other request
  gets 401 with ``WWW-Authenticate`` and a problem body. The session's access token is refreshed
  before it expires (single-flight), the upstream gets it as ``Authorization: Bearer``, and the
  identity forwarder sees the person (``ctx.token`` kind ``idporten``, ``ctx.person``).

The endpoints under ``persons.prefix`` (default ``/portvakt``) are served by ``serve`` before
routing (``endpoints``): ``login``, ``callback``, ``logout``, ``logout/callback``,
``logout/frontchannel``, ``session`` and ``session/refresh``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from filters.issuers import ACR_RANKS
from filters.persons.config import PersonsConfig, RoutePersonPolicy
from filters.persons.cookies import strip_cookies
from filters.persons.oidc import Provider, ProviderUnavailable, acr_rank
from filters.persons.sessions import RefreshFailed, SessionManager, session_hash
from filters.persons.store import MemoryStore, RedisStore, StoreUnavailable, build_store
from gateway import problems
from gateway.chain import ALLOW, SKIP, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.context import RequestContext, TokenIdentity
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import ConfigBase as Config
    from gateway.configbase import RouteBase as RouteConfig

log = logging.getLogger("portvakt.persons")

LOGIN_COOKIE = "__Host-portvakt-login"

LOGIN_REQUIRED = problems.register("login_required", 401, "Login required")
STEP_UP_REQUIRED = problems.register("step_up_required", 401, "A higher authentication level is required")
SESSION_UNAVAILABLE = problems.register(
    "session_store_unavailable", 503, "Sessions are unavailable right now"
)
PROVIDER_UNAVAILABLE = problems.register(
    "login_provider_unavailable", 503, "The login provider is unavailable right now"
)
BEARER_ON_SESSION_ROUTE = problems.register(
    "authorization_on_session_route", 400, "This route uses the login session; do not send Authorization"
)

CANONICAL_ACR = {
    "Level3": "idporten-loa-substantial",
    "Level4": "idporten-loa-high",
    "Level2": "idporten-loa-low",
}


def canonical_acr(acr: str) -> str:
    return CANONICAL_ACR.get(acr, acr)


@dataclass(slots=True, frozen=True)
class PersonFacts:
    """What the chain knows of the logged-in person (beside ``ctx.token``)."""

    session: str  # hashed session id
    auth_time: int | None
    amr: tuple[str, ...]
    locale: str | None


def is_navigation(ctx: RequestContext) -> bool:
    """A top-level browser navigation (send it to login) rather than XHR/fetch (answer 401)."""
    if ctx.method not in ("GET", "HEAD"):
        return False
    h = ctx.headers
    mode = h.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate" and h.get("Sec-Fetch-Dest", "document") in ("document", "")
    return "text/html" in h.get("Accept", "")


class CookieStripFilter(Filter):
    name = "persons_cookies"

    def __init__(self, names: frozenset[str]):
        self.names = names
        self.mode = Mode.enforce

    async def check(self, ctx: RequestContext) -> Decision:
        values = ctx.headers.getall("Cookie", ())
        # Any configured cookie name (``cookie_name`` need not contain "portvakt").
        if values and any("portvakt" in v or any(n in v for n in self.names) for v in values):
            kept = strip_cookies(values, self._ours)
            hdrs = ctx.upstream_headers if ctx.upstream_headers is not None else {}
            hdrs["Cookie"] = kept
            ctx.upstream_headers = hdrs
        return SKIP

    def _ours(self, name: str) -> bool:
        return name in self.names or name.startswith("__Host-portvakt")


class PersonFilter(Filter):
    name = "persons"
    timeout = 30.0

    def __init__(self, stage: PersonsStage, policy: RoutePersonPolicy):
        self.stage = stage
        self.policy = policy
        self.min_acr = canonical_acr(policy.min_acr or stage.cfg.provider.acr_values_default)
        self.mode = Mode.enforce

    async def check(self, ctx: RequestContext) -> Decision:
        st = self.stage
        if "Authorization" in ctx.headers:
            return Deny(Problem(BEARER_ON_SESSION_ROUTE))
        try:
            s = await st.sessions.load(ctx.headers)
            if s is None:
                return self._login(ctx, LOGIN_REQUIRED)
            if acr_rank(s.acr, st.cfg.provider.eidas_high_as_high) < acr_rank(self.min_acr):
                ctx.audit["persons"] = {
                    "session": session_hash(s.id),
                    "acr": s.acr or "",
                    "required": self.min_acr,
                }
                return self._login(ctx, STEP_UP_REQUIRED)
            s = await st.sessions.ensure_fresh(s)
        except StoreUnavailable:
            return Deny(Problem(SESSION_UNAVAILABLE, headers={"Retry-After": "2"}))
        except RefreshFailed:
            return self._login(ctx, LOGIN_REQUIRED, internal="session_refresh_refused")
        except ProviderUnavailable:
            return Deny(Problem(PROVIDER_UNAVAILABLE, headers={"Retry-After": "5"}))
        d = s.data
        ctx.token = TokenIdentity(
            kind="idporten",
            issuer="persons",
            iss=d["iss"],
            exp=int(d["at_exp"]),
            pid=d.get("pid"),
            acr=d.get("acr"),
            amr=tuple(d.get("amr") or ()),
            client_id=st.cfg.provider.client_id,
        )
        ctx.person = PersonFacts(
            session_hash(s.id), d.get("auth_time"), tuple(d.get("amr") or ()), d.get("locale")
        )
        hdrs = ctx.upstream_headers if ctx.upstream_headers is not None else {}
        hdrs["Authorization"] = (
            f"Bearer {d['access_token']}"
            if self.policy.forward_access_token and d.get("access_token")
            else None
        )
        ctx.upstream_headers = hdrs
        # A page made for this person: never kept by a shared cache nor reused from disk for the
        # next person at the same browser (the upstream's own Cache-Control is overridden).
        ctx.response_headers["Cache-Control"] = "no-store"
        ctx.audit["persons"] = {"session": ctx.person.session}
        return ALLOW

    def _login(self, ctx: RequestContext, reason: str, internal: str | None = None) -> Decision:
        st = self.stage
        target = ctx.raw_path + (f"?{ctx.query_string}" if ctx.query_string else "")
        q = {"redirect": target, "level": self.min_acr}
        if self.policy.prompt:
            q["prompt"] = self.policy.prompt
        login = f"{st.prefix}/login?{urlencode(q, quote_via=quote)}"
        if is_navigation(ctx):
            return Deny(
                Problem(
                    reason,
                    status=302,
                    internal_reason=internal,
                    headers={"Location": login, "Cache-Control": "no-store"},
                )
            )
        if reason == STEP_UP_REQUIRED:
            www = (
                f'Bearer error="insufficient_user_authentication", '
                f'error_description="A higher authentication level is required", acr_values="{self.min_acr}"'
            )
        else:
            www = 'Bearer realm="portvakt"'
        return Deny(
            Problem(
                reason,
                internal_reason=internal,
                headers={"WWW-Authenticate": www, "Location": login},
                extra={"login": login, "acr_values": self.min_acr},
            )
        )


class PersonsStage(Stage):
    name = "persons"

    def __init__(self, cfg: PersonsConfig, provider: Provider, env: BuildEnv):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.provider = provider
        # Sessions outlive a reload: the store (and, for memory, the sessions) is kept while
        # persons.store is unchanged (gateway.resources).
        self._store: Lease[MemoryStore | RedisStore] = env.resources.acquire(
            ("persons.store", cfg.store), lambda: build_store(cfg.store)
        )
        self.store = self._store.resource
        self._audit: Any = None
        self.sessions = SessionManager(cfg, self.store, provider, self.audit_event)
        self.cookie_filter = CookieStripFilter(frozenset({cfg.cookie_name, LOGIN_COOKIE}))
        self.allowed_redirect_hosts = frozenset(h.lower() for h in cfg.allowed_redirect_hosts)
        self.locales = frozenset(cfg.ui_locales)
        self._route_filters: dict[str, PersonFilter] = {}
        self._retries: set[Any] = set()
        self.endpoint_filters: tuple[Filter, ...] = ()
        self.login_filters: tuple[Filter, ...] = ()

    def retry_frontchannel(self, iss: str, sid: str, request_id: str) -> None:
        """End (iss, sid)'s sessions once the store is back: every 2 s, for at most 10 minutes."""
        import asyncio

        async def run() -> None:
            from filters.persons.sessions import session_hash, sid_index_key

            for _ in range(300):
                await asyncio.sleep(2)
                try:
                    ended = await self.sessions.end_by_sid(iss, sid)
                except StoreUnavailable:
                    continue
                if ended:
                    self.audit_event(
                        {
                            "type": "logout_frontchannel",
                            "request_id": request_id,
                            "retried": True,
                            "op_session": sid_index_key(iss, sid)[:32],
                            "sessions": [session_hash(i) for i in ended],
                            "cookie_seen": False,
                        }
                    )
                return
            log.error("persons: front-channel logout could not reach the session store for 10 minutes")

        if len(self._retries) < 1000:
            t = asyncio.get_running_loop().create_task(run())
            self._retries.add(t)
            t.add_done_callback(self._retries.discard)

    def set_endpoint_filters(self, endpoint: tuple[Filter, ...], login: tuple[Filter, ...]) -> None:
        """The endpoints run before routing, so they get their own small chains, compiled by the
        runtime (gateway/runtime.py): ``endpoint`` (the ingress stage's checks) on every
        endpoint, ``login`` (plus the rate limit, ``persons.rate_limits``) on login start and
        callback."""
        self.endpoint_filters = endpoint
        self.login_filters = login

    async def guard(self, ctx: RequestContext) -> Any:
        """The endpoints' chain: a ``Deny`` (the server renders it, audited once) or None."""
        from gateway.chain import run_chain

        sub = ctx.path[len(self.prefix) :]
        filters = self.login_filters if sub in ("/login", "/callback") else self.endpoint_filters
        return await run_chain(filters, ctx) if filters else None

    def attach_audit(self, audit: Any) -> None:
        self._audit = audit

    def audit_event(self, rec: dict[str, Any], pid: str | None = None) -> None:
        a = self._audit
        if a is not None:
            a.event(rec, pid)

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        out: list[Filter] = [self.cookie_filter]
        policy = getattr(route, "person", None)
        if policy is not None:
            f = PersonFilter(self, policy)
            self._route_filters[route.name] = f
            out.append(f)
        return out

    async def start(self) -> None:
        await self._store.start()  # a store kept from the previous runtime is running already
        await self.provider.start()

    async def close(self) -> None:
        for t in list(self._retries):
            t.cancel()
        await self.provider.close()
        await self._store.release()

    def readiness(self) -> dict[str, str]:
        return {"provider": self.provider.readiness(), "store": self.store.readiness()}

    async def serve(self, ctx: RequestContext, request: Any) -> Any:
        from filters.persons.endpoints import serve

        return await serve(self, ctx, request)


def config_problems(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-section checks (called from gateway.config)."""
    errs: list[tuple[tuple[Any, ...], str]] = []
    p = getattr(cfg, "persons", None)
    for i, r in enumerate(cfg.routes):
        if getattr(r, "person", None) is not None and (p is None or not p.enabled):
            errs.append((("routes", i, "person"), "needs the persons: section (login)"))
        if p is not None and p.enabled and r.match.path_prefix.startswith(p.prefix + "/"):
            errs.append(
                (("routes", i, "match", "path_prefix"), f"{p.prefix}/ is reserved for the login endpoints")
            )
    if p is not None and p.enabled and p.store.backend == "memory" and cfg.server.workers > 1:
        errs.append(
            (("persons", "store", "backend"), "memory sessions are per process: use redis with workers > 1")
        )
    return errs


def build_stage(env: BuildEnv) -> PersonsStage | None:
    cfg: PersonsConfig | None = getattr(env.config, "persons", None)
    if cfg is None or not cfg.enabled:
        return None
    return PersonsStage(cfg, Provider(cfg.provider, env.config.resolve_path), env)


__all__ = ["PersonsConfig", "RoutePersonPolicy", "PersonsStage", "build_stage", "ACR_RANKS", "LOGIN_COOKIE"]
