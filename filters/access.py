"""Privileges and route access policy: the route's ``access:`` block (with ``service``,
``legal_basis`` and ``organization_from`` on the route).

Runs after the credential stages (certificates, tokens, integrations) have written verified facts
to the context. It finds the target organisation (``organization_from``: a path template or a
header; validated mod-11), then admits the request when one rule of ``access.any_of`` admits it:

- ``{integration: true, scopes: [...]}``: a verified Fiks integration, the token's scopes, and a
  grant from the target organisation to this integration for the route's ``service``.
- ``{person: true, acr: ..., pid_from: "path:/.../{pid}/"}``: an ID-porten person at ``acr`` or
  higher; with ``pid_from``, only for the person's own pid in the path.
- ``{certificate_orgs: [...]}``: an enterprise client certificate of one of these orgs.
- ``{organizations: [...], scopes: [...]}``: a token whose consumer org is listed.

No credential at all -> 401 ``authentication_required`` (``WWW-Authenticate: Bearer``); credentials
but no admitting rule -> 403 with the most specific reason among the rules that applied.
Grants come from ``integrations[].grants`` and are compiled at load into one set; a reload that
drops a grant stops the next request. Grant changes on reload are logged (``portvakt.grants``).
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from filters.issuers import ACR_RANKS, acr_rank  # the one ordering of ID-porten levels
from gateway import norid, problems
from gateway.chain import ALLOW, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.configbase import Model
from gateway.context import RequestContext
from gateway.problems import BAD_REQUEST, Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig

log = logging.getLogger("portvakt.authorize")
grant_log = logging.getLogger("portvakt.grants")

# --- config --------------------------------------------------------------------------------


class AccessRule(Model):
    integration: bool = Field(
        False, description="A verified Fiks integration with a grant for this route's service"
    )
    scopes: list[str] = Field(default_factory=list, description="Token scopes all required")
    person: bool = Field(False, description="An ID-porten person")
    acr: str | None = Field(None, description="Minimum ID-porten level for persons")
    pid_from: str | None = Field(
        None, description="path:/template/{pid}/ - the person may only reach their own pid"
    )
    certificate_orgs: list[str] = Field(
        default_factory=list, description="Client certificate org numbers admitted"
    )
    organizations: list[str] = Field(default_factory=list, description="Token consumer orgs admitted")

    @field_validator("acr")
    @classmethod
    def _acr(cls, v: str | None) -> str | None:
        if v is not None and v not in ACR_RANKS:
            raise ValueError(f"unknown acr {v!r}; known: {', '.join(ACR_RANKS)}")
        return v

    @field_validator("pid_from")
    @classmethod
    def _pid_from(cls, v: str | None) -> str | None:
        if v is not None:
            compile_path_template(v, "pid")  # raises ValueError with the reason
        return v

    @field_validator("certificate_orgs", "organizations")
    @classmethod
    def _orgs(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if not norid.is_org_number_shape(o)]
        if bad:
            raise ValueError(f"not 9-digit organisation numbers: {bad}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> AccessRule:
        kinds = [
            k
            for k, on in (
                ("integration", self.integration),
                ("person", self.person),
                ("certificate_orgs", bool(self.certificate_orgs)),
                ("organizations", bool(self.organizations)),
            )
            if on
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a rule needs exactly one of integration: true, person: true, certificate_orgs, organizations"
                + (f" (has {', '.join(kinds)})" if kinds else "")
            )
        if (self.acr or self.pid_from) and not self.person:
            raise ValueError("acr and pid_from only apply to person rules")
        if self.scopes and self.certificate_orgs:
            raise ValueError("scopes need a token: not allowed on a certificate_orgs rule")
        return self


class AccessPolicy(Model):
    any_of: list[AccessRule] = Field(description="The request passes when one rule admits it")
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce for this route's authorization")
    allow_certificate_org_mismatch: bool = Field(
        False,
        description="Admit a client certificate whose org differs from the token's consumer (and supplier) org; "
        "both orgs then reach the upstream. Default: such a request gets 401 (token_certificate_org_mismatch)",
    )

    @field_validator("any_of")
    @classmethod
    def _non_empty(cls, v: list[AccessRule]) -> list[AccessRule]:
        if not v:
            raise ValueError("needs at least one rule (omit access: for a public route)")
        return v


# --- problems --------------------------------------------------------------------------------

AUTHENTICATION_REQUIRED = problems.register("authentication_required", 401, "Authentication required")
ACCESS_DENIED = problems.register("access_denied", 403, "No access rule admits this request")
MISSING_PRIVILEGE = problems.register(
    "missing_privilege", 403, "The organisation has not granted this integration access to the service"
)
INTEGRATION_REQUIRED = problems.register("integration_required", 403, "Fiks integration credentials required")
INSUFFICIENT_SCOPE = problems.register("insufficient_scope", 403, "The token lacks a required scope")
INSUFFICIENT_ACR = problems.register("insufficient_acr", 403, "A higher authentication level is required")
NOT_OWN_DATA = problems.register("not_own_data", 403, "Persons may only reach their own data")
INVALID_ORGANIZATION_NUMBER = problems.register(
    "invalid_organization_number", 400, "Invalid organisation number"
)
INVALID_NATIONAL_IDENTITY_NUMBER = problems.register(
    "invalid_national_identity_number", 400, "Invalid national identity number"
)

BEARER_CHALLENGE = 'Bearer realm="portvakt"'


# --- templates -------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
# Dot segments (also Tomcat's "..;"), encoded dots/slashes/backslashes: an upstream may resolve
# them to a different resource than the one the template matched.
_AMBIGUOUS = re.compile(r"(?:^|/)\.{1,2}(?:[/;]|$)|%2[eEfF]|%5[cC]|\\")


def compile_path_template(spec: str, var: str) -> re.Pattern[str]:
    """Compile ``"path:/prefix/{var}/..."`` into a regex matching the raw request path from its
    start, capturing the segment as group ``v``. Raises ValueError for anything else."""
    if not spec.startswith("path:/"):
        raise ValueError(f'must be "path:/.../{{{var}}}/..."')
    tpl = spec[len("path:") :]
    names = _PLACEHOLDER.findall(tpl)
    if names != [var]:
        raise ValueError(f"template needs exactly one {{{var}}} placeholder and no other")
    before, after = tpl.split("{" + var + "}")
    if not before.endswith("/") or (after and not after.startswith("/")):
        raise ValueError(f"{{{var}}} must be a whole path segment")
    if "{" in tpl.replace("{" + var + "}", "") or "}" in tpl.replace("{" + var + "}", ""):
        raise ValueError("stray brace in template")
    # A trailing slash in the template also matches the path's end: "/orgs/{organization}/"
    # covers "/orgs/958935420" and "/orgs/958935420/anything".
    rest = after[:-1] if after.endswith("/") else after
    return re.compile("^" + re.escape(before) + "(?P<v>[^/]+)" + re.escape(rest) + "(?:/|$)")


@dataclass(slots=True, frozen=True)
class OrgSource:
    path: re.Pattern[str] | None = None
    header: str | None = None


def compile_org_source(spec: str) -> OrgSource:
    if spec.startswith("header:"):
        name = spec[len("header:") :]
        if not re.match(r"^[A-Za-z0-9-]+\Z", name):
            raise ValueError("header name must be letters, digits and '-'")
        return OrgSource(header=name)
    return OrgSource(path=compile_path_template(spec, "organization"))


def route_policy_problems(route: RouteConfig) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-field problems of one route's policy, as (yaml sub-path, message); empty when fine."""
    errs: list[tuple[tuple[Any, ...], str]] = []
    # gateway.config already reports values of neither form; here the finer template rules.
    if route.organization_from and route.organization_from.startswith("path:/"):
        try:
            compile_org_source(route.organization_from)
        except ValueError as e:
            errs.append((("organization_from",), str(e)))
    if route.organization_from and route.access is None:
        # Only the access: rules compare the target organisation with a credential (and only then
        # is X-Portvakt-Target-Org sent); on a person/party/privilege route the privilege is
        # checked in the organisation the person acts for. Silently ignored, the key would let an
        # operator believe the path's organisation is checked (red team 2, F11).
        errs.append(
            (
                ("organization_from",),
                "has no effect without access: rules (a person's privilege is checked in the "
                "organisation the person acts for, not the one in the path); remove it or add access:",
            )
        )
    if route.access is not None:
        for i, rule in enumerate(route.access.any_of):
            if rule.integration and not route.service:
                errs.append((("access", "any_of", i), "an integration rule needs the route's service"))
            if rule.integration and not route.organization_from:
                errs.append(
                    (("access", "any_of", i), "an integration rule needs the route's organization_from")
                )
    return errs


# --- compiled policy -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Rule:
    index: int
    kind: str  # integration | person | certificate | organization
    scopes: frozenset[str]
    acr_rank: int
    acr: str | None
    pid_path: re.Pattern[str] | None
    orgs: frozenset[str]


@dataclass(slots=True, frozen=True)
class _Failure:
    level: int  # higher: more specific to the credential presented
    reason: str
    internal: str
    headers: tuple[tuple[str, str], ...] = ()


# Level 0: the rule is about a credential the request does not carry.
_NOT_APPLICABLE = 0


def _compile_rule(index: int, r: AccessRule) -> _Rule:
    kind = (
        "integration"
        if r.integration
        else "person"
        if r.person
        else "certificate"
        if r.certificate_orgs
        else "organization"
    )
    return _Rule(
        index=index,
        kind=kind,
        scopes=frozenset(r.scopes),
        acr_rank=acr_rank(r.acr) if r.acr else 0,
        acr=r.acr,
        pid_path=compile_path_template(r.pid_from, "pid") if r.pid_from else None,
        orgs=frozenset(r.certificate_orgs or r.organizations),
    )


class AuthorizeFilter(Filter):
    name = "authorize"

    def __init__(self, stage: AuthorizeStage, route: RouteConfig):
        assert route.access is not None
        self.stage = stage
        self.mode = route.access.mode
        self.service = route.service
        self.legal_basis = route.legal_basis
        self.org_source = compile_org_source(route.organization_from) if route.organization_from else None
        self.rules = tuple(_compile_rule(i, r) for i, r in enumerate(route.access.any_of))
        self.uses_certificates = any(r.kind == "certificate" for r in self.rules)
        self.pid_paths = tuple(dict.fromkeys(r.pid_path for r in self.rules if r.pid_path is not None))
        self.uses_paths = self.pid_paths != () or (
            self.org_source is not None and self.org_source.path is not None
        )

    def _audit(self, ctx: RequestContext, **facts: Any) -> None:
        ctx.audit["authorize"] = {"service": self.service, "legal_basis": self.legal_basis, **facts}

    def _deny(
        self,
        ctx: RequestContext,
        reason: str,
        internal: str | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> Deny:
        self._audit(ctx, result="denied", reason=internal or reason, target_org=ctx.target_org)
        return Deny(Problem(reason, detail=detail, internal_reason=internal, headers=headers or {}))

    async def check(self, ctx: RequestContext) -> Decision:
        has_cert = ctx.certificate is not None and self.uses_certificates
        if ctx.token is None and ctx.integration is None and not has_cert:
            return self._deny(
                ctx,
                AUTHENTICATION_REQUIRED,
                headers={"WWW-Authenticate": BEARER_CHALLENGE},
                detail="This route requires a bearer token.",
            )
        raw = ctx.raw_path
        if self.uses_paths and _AMBIGUOUS.search(raw):
            return self._deny(
                ctx, BAD_REQUEST, "ambiguous_path", detail="Path has dot segments or encoded separators."
            )
        denied = self._find_target_org(ctx, raw)
        if denied is not None:
            return denied
        path_pids: dict[re.Pattern[str], str] = {}
        for pat in self.pid_paths:
            m = pat.match(raw)
            if m is None:
                continue
            pid = m.group("v")
            if not norid.is_pid(pid):
                return self._deny(
                    ctx,
                    INVALID_NATIONAL_IDENTITY_NUMBER,
                    detail="The national identity number in the path is not valid.",
                )
            path_pids[pat] = pid
            if ctx.target_pid is None:
                ctx.target_pid = pid

        best: _Failure | None = None
        for rule in self.rules:
            failure = self._evaluate(rule, ctx, path_pids)
            if failure is None:
                self._audit(
                    ctx,
                    result="allowed",
                    rule=rule.index,
                    kind=rule.kind,
                    target_org=ctx.target_org,
                    **({"own_pid": True} if rule.pid_path is not None else {}),
                )
                return ALLOW
            if best is None or failure.level > best.level:
                best = failure
        assert best is not None  # AccessPolicy has at least one rule
        return self._deny(ctx, best.reason, best.internal, dict(best.headers))

    def _find_target_org(self, ctx: RequestContext, raw: str) -> Deny | None:
        src = self.org_source
        if src is None:
            return None
        value: str | None = None
        if src.path is not None:
            m = src.path.match(raw)
            value = m.group("v") if m else None
        else:
            values = ctx.headers.getall(src.header, [])  # type: ignore[arg-type]  # header: set when path is not
            if len(values) > 1:
                return self._deny(
                    ctx,
                    INVALID_ORGANIZATION_NUMBER,
                    "organization_header_repeated",
                    detail=f"{src.header} was sent more than once.",
                )
            value = values[0].strip() if values else None
        if value is None:
            return None
        if not norid.is_org_number(value):
            return self._deny(
                ctx, INVALID_ORGANIZATION_NUMBER, detail="The organisation number is not valid."
            )
        ctx.target_org = value
        return None

    def _scope_failure(self, rule: _Rule, ctx: RequestContext) -> _Failure | None:
        assert ctx.token is not None
        missing = rule.scopes - ctx.token.scopes
        if not missing:
            return None
        wanted = " ".join(sorted(rule.scopes))
        return _Failure(
            2,
            INSUFFICIENT_SCOPE,
            INSUFFICIENT_SCOPE,
            (("WWW-Authenticate", f'Bearer realm="portvakt", error="insufficient_scope", scope="{wanted}"'),),
        )

    def _evaluate(
        self, rule: _Rule, ctx: RequestContext, path_pids: dict[re.Pattern[str], str]
    ) -> _Failure | None:
        """None when ``rule`` admits the request, else why not (with how specific that is)."""
        tok = ctx.token
        if rule.kind == "integration":
            if ctx.integration is None:
                if tok is not None and tok.kind == "maskinporten":
                    return _Failure(1, INTEGRATION_REQUIRED, INTEGRATION_REQUIRED)
                return _Failure(_NOT_APPLICABLE, ACCESS_DENIED, "no_integration")
            if tok is None:  # the integrations stage binds a token; defend against detect-mode gaps
                return _Failure(1, INTEGRATION_REQUIRED, "integration_without_token")
            f = self._scope_failure(rule, ctx)
            if f is not None:
                return f
            if ctx.target_org is None:
                return _Failure(3, MISSING_PRIVILEGE, "target_organization_missing")
            if (ctx.integration.id, ctx.target_org, self.service) not in self.stage.grants:
                return _Failure(3, MISSING_PRIVILEGE, MISSING_PRIVILEGE)
            return None
        if rule.kind == "person":
            if tok is None or tok.kind != "idporten" or not tok.pid:
                return _Failure(_NOT_APPLICABLE, ACCESS_DENIED, "not_a_person")
            if rule.acr is not None and acr_rank(tok.acr) < rule.acr_rank:
                return _Failure(2, INSUFFICIENT_ACR, INSUFFICIENT_ACR)
            f = self._scope_failure(rule, ctx)
            if f is not None:
                return f
            if rule.pid_path is not None:
                pid = path_pids.get(rule.pid_path)
                if pid is None:
                    # The path does not name a person where this rule expects one: fail closed.
                    return _Failure(3, NOT_OWN_DATA, "pid_not_in_path")
                if not hmac.compare_digest(pid.encode(), tok.pid.encode()):
                    return _Failure(3, NOT_OWN_DATA, NOT_OWN_DATA)
            return None
        if rule.kind == "certificate":
            cert = ctx.certificate
            if cert is None or not cert.org_number:
                return _Failure(_NOT_APPLICABLE, ACCESS_DENIED, "no_certificate")
            if cert.org_number not in rule.orgs:
                return _Failure(1, ACCESS_DENIED, "certificate_org_not_admitted")
            return None
        # organization
        if tok is None or not tok.consumer_org:
            return _Failure(_NOT_APPLICABLE, ACCESS_DENIED, "no_consumer_org")
        if tok.consumer_org not in rule.orgs:
            return _Failure(1, ACCESS_DENIED, "organization_not_admitted")
        return self._scope_failure(rule, ctx)


class AuthorizeStage(Stage):
    name = "authorize"

    def __init__(self, grants: frozenset[tuple[str, str, str]]):
        self.grants = grants
        self._grant_changes: list[tuple[str, str, str, str]] = []

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        if route.access is None or route.access.mode is Mode.off:
            return []
        return [AuthorizeFilter(self, route)]

    def adopt(self, previous: Stage) -> None:
        """Note the grant changes; they are logged when this runtime starts (a reload that
        fails to build or start changes no grant, so it must not log one)."""
        if not isinstance(previous, AuthorizeStage):
            return
        self._grant_changes = [("added", *g) for g in sorted(self.grants - previous.grants)]
        self._grant_changes += [("withdrawn", *g) for g in sorted(previous.grants - self.grants)]

    async def start(self) -> None:
        changes, self._grant_changes = self._grant_changes, []
        for what, iid, org, service in changes:
            grant_log.info("grant %s: integration=%s organization=%s service=%s", what, iid, org, service)


def compile_grants(integrations: list[Any]) -> frozenset[tuple[str, str, str]]:
    """(integration id, organisation, service) for every grant in ``integrations:``."""
    return frozenset(
        (integ.id, g.organization, service)
        for integ in integrations
        for g in integ.grants
        for service in g.services
    )


def build_stage(env: BuildEnv) -> AuthorizeStage:
    cfg = env.config
    for i, route in enumerate(cfg.routes):
        errs = route_policy_problems(route)
        if errs:
            loc, msg = errs[0]
            raise ValueError(f"routes[{i}].{'.'.join(str(p) for p in loc)}: {msg}")
    return AuthorizeStage(compile_grants(list(cfg.integrations)))
