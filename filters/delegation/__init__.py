"""Acting for an organisation and delegated administration. Config ``delegation:``; a route's
``party:`` and ``privilege:`` blocks (``filters.delegation.config``).

- **Parties** (``parties``, ``altinn``): a logged-in person's parties come from Altinn 3
  authorized parties; ``GET <persons.prefix>/parties`` lists them, ``POST <persons.prefix>/party``
  chooses one. On a ``party:`` route the choice is re-checked against the cached list (fetched
  again after ``altinn.cache_seconds``) on every request and reaches the upstream as
  ``X-Portvakt-Acting-Org`` and ``acting_org`` in the signed assertion. Altinn down: 503 on
  ``party:`` routes; the person's own routes never ask Altinn.
- **Privileges** (``store``): run-time grants organisation -> person|integration -> role ->
  service. A ``privilege:`` route needs a grant in the acting organisation (persons) or in the
  target organisation (integrations), read from the store on every request.
- **Admin API and page** (``admin``), under ``<persons.prefix><admin_api.path>``: list, grant,
  withdraw, the organisation's audit view (``auditview``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

from filters.delegation.altinn import AltinnClient, AltinnUnavailable
from filters.delegation.config import (
    ADMIN,
    ALL_SERVICES,
    DelegationConfig,
    RoutePartyPolicy,
    RoutePrivilegePolicy,
)
from filters.delegation.store import (
    PrivilegesUnavailable,
    RedisStore,
    SqliteStore,
    admits,
    build_store,
    now_iso,
)
from filters.persons.store import StoreUnavailable
from gateway import problems
from gateway.chain import ALLOW, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.context import RequestContext
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import ConfigBase as Config
    from gateway.configbase import RouteBase as RouteConfig

log = logging.getLogger("portvakt.delegation")


PARTY_REQUIRED = problems.register("party_required", 403, "Choose the organisation you act for")
PARTY_NOT_HELD = problems.register("party_not_held", 403, "You do not act for this organisation")
ALTINN_UNAVAILABLE = problems.register(
    "role_source_unavailable", 503, "The role source is unavailable right now"
)
PRIVILEGES_UNAVAILABLE = problems.register(
    "privileges_unavailable", 503, "Privileges are unavailable right now"
)
PRIVILEGE_MISSING = problems.register("privilege_missing", 403, "No grant for this service")
SESSIONS_DOWN = "session_store_unavailable"


def subject_ref(key: bytes, pid: str) -> str:
    return hmac.new(key, b"portvakt-subject|" + pid.encode(), hashlib.sha256).hexdigest()[:32]


def masked(pid: str) -> str:
    return pid[:6] + "*****"


class PartyFilter(Filter):
    name = "party"
    timeout = 15.0

    def __init__(self, stage: DelegationStage, policy: RoutePartyPolicy):
        self.stage = stage
        self.forms = frozenset(policy.organization_forms)
        self.mode = Mode.enforce

    async def check(self, ctx: RequestContext) -> Decision:
        from filters.delegation import parties

        st = self.stage
        persons = ctx.runtime.persons
        pid = ctx.token.pid if ctx.token is not None and ctx.person is not None else None
        if persons is None or not pid:
            return Deny(Problem(PARTY_REQUIRED, internal_reason="party_without_person"))
        try:
            # No choice made: say so without asking Altinn. Else re-check against a fresh list.
            state = await parties.load(st, persons, ctx.headers, pid, fresh=False)
            if state is not None and state.chosen is not None:
                state = await parties.load(st, persons, ctx.headers, pid)
        except AltinnUnavailable as e:
            log.warning("delegation: role source unavailable: %s", e)
            return Deny(Problem(ALTINN_UNAVAILABLE, headers={"Retry-After": "5"}))
        except StoreUnavailable:
            return Deny(Problem(SESSIONS_DOWN, headers={"Retry-After": "2"}))
        if state is None or state.chosen is None:
            return Deny(Problem(PARTY_REQUIRED, extra={"parties": f"{persons.prefix}/parties"}))
        p = state.find(state.chosen)
        if p is None or not p["selectable"] or (self.forms and p["unit_type"] not in self.forms):
            ctx.audit["party"] = {"chosen": state.chosen[:64], "held": False}
            return Deny(
                Problem(
                    PARTY_NOT_HELD,
                    internal_reason="party_no_longer_held" if p is None else "party_not_selectable",
                )
            )
        ctx.acting_org = p["org"]
        ctx.audit["party"] = {"acting_org": p["org"]}
        return ALLOW


class PrivilegeFilter(Filter):
    name = "privilege"

    def __init__(self, stage: DelegationStage, policy: RoutePrivilegePolicy, service: str):
        self.stage = stage
        self.role = policy.role
        self.service = service
        self.mode = Mode.enforce

    async def check(self, ctx: RequestContext) -> Decision:
        st = self.stage
        if ctx.person is not None and ctx.token is not None and ctx.token.pid:
            org, kind, ref = ctx.acting_org, "person", st.person_ref(ctx.token.pid)
        elif ctx.integration is not None:
            org, kind, ref = (
                ctx.target_org or ctx.integration.authorized_org,
                "integration",
                ctx.integration.id,
            )
        else:
            return Deny(Problem(PRIVILEGE_MISSING, internal_reason="privilege_no_subject"))
        if not org:
            return Deny(Problem(PARTY_REQUIRED))
        try:
            grants = await st.store.grants(org)
        except PrivilegesUnavailable:
            return Deny(Problem(PRIVILEGES_UNAVAILABLE, headers={"Retry-After": "2"}))
        for g in grants:
            s = g["subject"]
            if (
                s["kind"] == kind
                and hmac.compare_digest(s["ref"], ref)
                and admits(g, self.role, self.service)
            ):
                ctx.audit["privilege"] = {"organization": org, "grant": g["id"], "role": g["role"]}
                return ALLOW
        ctx.audit["privilege"] = {"organization": org, "role": self.role}
        return Deny(Problem(PRIVILEGE_MISSING))


class DelegationStage(Stage):
    name = "delegation"

    def __init__(self, cfg: DelegationConfig, env: BuildEnv):
        self.cfg = cfg
        self.env = env
        self.subject_key = cfg.subject_key.encode()
        # The privilege store and the Altinn client are kept across reloads while their config is
        # the same (gateway.resources).
        resolve = env.config.resolve_path
        where = resolve(cfg.store.path) if cfg.store.backend == "sqlite" and cfg.store.path else None
        self._store: Lease[SqliteStore | RedisStore] = env.resources.acquire(
            ("delegation.store", cfg.store, where), lambda: build_store(cfg.store, resolve)
        )
        self.store = self._store.resource
        altinn = cfg.altinn
        self._altinn: Lease[AltinnClient] | None = (
            env.resources.acquire(("delegation.altinn", altinn), lambda: AltinnClient(altinn, resolve))
            if altinn is not None
            else None
        )
        self.altinn = self._altinn.resource if self._altinn is not None else None
        self.cache_seconds = cfg.altinn.cache_seconds if cfg.altinn is not None else 300.0
        self.audit: Any = None
        self.persons_prefix = getattr(env.config.persons, "prefix", "/portvakt")
        self.admin_prefix = self.persons_prefix + cfg.admin_api.path
        self.services = sorted({r.service for r in env.config.routes if r.service})
        self._pending: list[tuple[dict[str, Any], str | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def person_ref(self, pid: str) -> str:
        return subject_ref(self.subject_key, pid)

    def attach_audit(self, audit: Any) -> None:
        self.audit = audit

    def audit_event(self, rec: dict[str, Any], pid: str | None = None) -> None:
        a = self.audit
        if a is None:
            return
        if getattr(a, "active", False) and getattr(a, "writer", None) is None:
            self._pending.append((dict(rec, time=now_iso()), pid))  # the trail starts after the stages
            return
        self._flush()
        a.event(rec, pid)

    def _flush(self) -> None:
        while self._pending and self.audit is not None:
            rec, pid = self._pending.pop(0)
            self.audit.event(rec, pid)

    async def _flush_when_audit_starts(self) -> None:
        for _ in range(600):
            if self.audit is None or getattr(self.audit, "writer", None) is not None:
                break
            await asyncio.sleep(0.05)
        self._flush()

    def audit_person(self, pid: str) -> dict[str, str] | None:
        """The audit trail's own protected form of a person (pseudonym, sealed)."""
        a = self.audit
        return a._person(pid) if a is not None and getattr(a, "active", False) else None

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        out: list[Filter] = []
        party = getattr(route, "party", None)
        priv = getattr(route, "privilege", None)
        if party is not None or (priv is not None and getattr(route, "person", None) is not None):
            out.append(PartyFilter(self, party or RoutePartyPolicy()))
        if priv is not None:
            out.append(PrivilegeFilter(self, priv, route.service or ""))
        return out

    def owns(self, path: str) -> bool:
        p = self.persons_prefix
        return (
            path in (p + "/parties", p + "/party")
            or path == self.admin_prefix
            or path.startswith(self.admin_prefix + "/")
        )

    async def start(self) -> None:
        # Kept from the previous runtime: running already, the leases start nothing.
        await self._store.start()
        if self._altinn is not None:
            await self._altinn.start()
        await self.seed()
        if self._pending:
            t = asyncio.get_running_loop().create_task(self._flush_when_audit_starts())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def seed(self) -> None:
        """Each configured first administrator holds org admin (idempotent; audited when new);
        a seeded grant the config no longer names is withdrawn (audited)."""
        current: set[str] = set()
        for s in self.cfg.admins:
            ref = self.person_ref(s.person)
            current.add("seed-" + ref[:12] + "-" + s.organization)
            g = {
                "id": "seed-" + ref[:12] + "-" + s.organization,
                "organization": s.organization,
                "subject": {"kind": "person", "ref": ref, "display": masked(s.person)},
                "role": ADMIN,
                "service": ALL_SERVICES,
                "granted_by": "config",
                "granted_at": now_iso(),
                "basis": "config: delegation.admins",
                "seeded": True,
                "audit_subject": self.audit_person(s.person),
            }
            try:
                _, new = await self.store.add(g)
            except PrivilegesUnavailable as e:
                log.warning("delegation: could not seed the admin of %s: %s", s.organization, e)
                continue
            if new:
                self.audit_event(
                    {
                        "type": "privilege_granted",
                        "organization": s.organization,
                        "grant": g["id"],
                        "role": ADMIN,
                        "service": ALL_SERVICES,
                        "subject": _audit_subject(g),
                        "by": "config",
                        "basis": g["basis"],
                    }
                )
        await self._withdraw_stale_seeds(current)

    async def _withdraw_stale_seeds(self, current: set[str]) -> None:
        """An administrator removed from ``delegation.admins`` (or re-keyed by a new
        ``subject_key``) loses the seeded grant at the next start or reload: the README promises
        that a seeded grant is withdrawn by changing the config."""
        try:
            stale = [g for g in await self.store.seeded_grants() if g["id"] not in current]
            for g in stale:
                gone = await self.store.remove_seeded(g["organization"], g["id"])
                if gone is None:
                    continue
                log.info(
                    "delegation: seeded admin grant %s of %s withdrawn (not in config)",
                    g["id"],
                    g["organization"],
                )
                self.audit_event(
                    {
                        "type": "privilege_withdrawn",
                        "organization": g["organization"],
                        "grant": g["id"],
                        "role": gone["role"],
                        "service": gone["service"],
                        "subject": _audit_subject(gone),
                        "by": "config",
                    }
                )
        except PrivilegesUnavailable as e:
            log.warning("delegation: could not withdraw seeded admins no longer configured: %s", e)

    async def close(self) -> None:
        await self._store.release()  # the last holder closes it
        if self._altinn is not None:
            await self._altinn.release()

    def readiness(self) -> dict[str, str]:
        out = {"privileges": self.store.readiness()}
        if self.altinn is not None:
            out["altinn"] = self.altinn.readiness()
        return out

    async def serve(self, ctx: RequestContext, request: Any, persons: Any) -> Any:
        from filters.delegation.endpoints import serve

        return await serve(self, persons, ctx, request)


def _audit_subject(g: dict[str, Any]) -> dict[str, Any]:
    s = g["subject"]
    if s["kind"] == "integration":
        return {"kind": "integration", "integration_id": s["ref"]}
    out: dict[str, Any] = {"kind": "person"}
    if g.get("audit_subject"):
        out["person"] = g["audit_subject"]
    return out


def config_problems(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-section checks (called from gateway.config)."""
    errs: list[tuple[tuple[Any, ...], str]] = []
    d: DelegationConfig | None = getattr(cfg, "delegation", None)
    on = d is not None and d.enabled
    for i, r in enumerate(cfg.routes):
        party, priv = getattr(r, "party", None), getattr(r, "privilege", None)
        if (party is not None or priv is not None) and not on:
            errs.append((("routes", i), "party:/privilege: need the delegation: section"))
        if party is not None and getattr(r, "person", None) is None:
            errs.append((("routes", i, "party"), "needs person: (a logged-in person chooses the party)"))
        if party is not None and on and d is not None and d.altinn is None:
            errs.append(
                (("delegation", "altinn"), f"route {r.name} has party: but no role source is configured")
            )
        if priv is not None and not r.service:
            errs.append((("routes", i, "privilege"), "needs the route's service: (grants name a service)"))
        if priv is not None and on and d is not None and priv.role != ADMIN and priv.role not in d.privileges:
            errs.append(
                (("routes", i, "privilege", "role"), f"{priv.role!r} is not in delegation.privileges")
            )
    if on and (getattr(cfg, "persons", None) is None or not cfg.persons.enabled):  # type: ignore[union-attr]
        errs.append((("delegation",), "needs the persons: section (the admin API is for logged-in persons)"))
    return errs


def build_stage(env: BuildEnv) -> DelegationStage | None:
    cfg: DelegationConfig | None = getattr(env.config, "delegation", None)
    if cfg is None or not cfg.enabled:
        return None
    return DelegationStage(cfg, env)


__all__ = ["DelegationConfig", "RoutePartyPolicy", "RoutePrivilegePolicy", "DelegationStage", "build_stage"]

# The endpoints' problem reasons are registered at import, like every other stage's.
from filters.delegation import endpoints as _endpoints  # noqa: E402,F401
